"""What every stage's thin CLI shares: config loading with overrides, the resolved config
written beside the outputs, logging.

    textbook generate --config params.yaml --set generate.n_exercises=4
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import yaml

from pipeline.core.config import RunConfig, load_config, resolved_dict
from pipeline.core.records import atomic_write_text


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="params.yaml", help="Params file (default: params.yaml).")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="Override a config key, e.g. --set generate.n_exercises=10 (repeatable).")
    parser.add_argument("-q", "--quiet", action="store_true", help="No progress bar.")
    parser.add_argument("-v", "--verbose", action="store_true", help="Debug logging.")


def load_stage_config(args: argparse.Namespace) -> tuple[RunConfig, Path]:
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # httpx logs every request at INFO: far too chatty for thousands of requests.
    for noisy in ("httpx", "httpx2"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    path = Path(args.config)
    return load_config(path, args.overrides), path


def write_resolved_config(cfg: RunConfig, configs_root: Path, stage: str, out_dir: Path) -> None:
    text = yaml.safe_dump(resolved_dict(cfg, configs_root, stage), sort_keys=True, allow_unicode=True)
    atomic_write_text(out_dir / "resolved_config.yaml", text)


def stage_cli(run, args: argparse.Namespace, summary, failures: dict[type, tuple[str, int]] | None = None) -> int:
    """A stage's `main`: load the config, run the stage's core, print `summary(result)` as one JSON
    line. An exception named in `failures` ({type: (what, exit status)}) is logged as one clear line,
    not a traceback, and its exit status returned."""
    from pipeline.core.records import dumps

    cfg, path = load_stage_config(args)
    try:
        result = run(cfg, path, progress=not args.quiet)
    except tuple(failures or {}) as exc:
        what, status = next(v for k, v in (failures or {}).items() if isinstance(exc, k))
        logging.getLogger(run.__module__).error("%s: %s", what, exc)
        return status
    print(dumps(summary(result)))
    return 0
