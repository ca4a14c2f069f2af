"""Controls stage: the record pools of the ablation's control arms, in the format the curation stages read.

phi-1 makes its case at equal training tokens against a control (its Figure 2.1), so phase 2 can
train on a control arm instead of the curated exercises (`finetune.source`). This stage writes an
arm's pool (`{arm}/pool/exercises.jsonl` and an empty `textbooks.jsonl`); dedupe and decontaminate
then run on it unchanged (dvc.yaml: `controls_*` stages), so an arm is curated exactly as far as its
question allows:

- `rejected`: the teacher's exercises the filter rejected (same prompts, same teacher, no quality
  filter), from `controls.rejected_input`: curated against rejected isolates the filter;
- `natural`: top-level functions with docstrings from Python source trees (`controls.natural_roots`,
  default the running Python's standard library), as exercises (signature and docstring, then the
  body: :mod:`pipeline.core.snippets`), a seeded sample of `controls.natural_max`. Mined once into a
  committed file (tools/mine_natural.sh), so every machine trains the same arm.

    textbook controls --set controls.arm=rejected
"""

from __future__ import annotations

import random
import sysconfig
import time
from pathlib import Path

from pipeline.core.artifacts import ControlsStats
from pipeline.core.config import ConfigError, RunConfig, configs_dir
from pipeline.core.records import iter_jsonl, sha256_text, write_jsonl
from pipeline.core.schema import require_parsed
from pipeline.core.snippets import exercise_parsed, extract_functions, iter_python_files, skip_reason
from pipeline.core.stage import stage_cli, write_resolved_config


def rejected_pool(path: Path) -> tuple[list[dict], dict]:
    """The filter's rejected exercises, their filter verdict kept as `control_reason`."""
    if not path.is_file():
        raise ConfigError(f"controls.rejected_input: {path} not found (run `textbook filter` first)")
    out, reasons = [], {}
    for rec in iter_jsonl(path, required=("id", "kind")):
        if rec["kind"] != "exercise":
            continue
        require_parsed(rec, f"controls.rejected_input {path}", "exercise")
        reason = str(rec.get("filter_reason") or "unknown")
        reasons[reason] = reasons.get(reason, 0) + 1
        out.append({**{k: v for k, v in rec.items() if not k.startswith("filter_")}, "control_reason": reason})
    return out, {"by_filter_reason": dict(sorted(reasons.items()))}


def natural_roots(roots: list[str]) -> list[Path]:
    """The configured roots, or the standard library of the Python running the stage."""
    return [Path(r) for r in roots] if roots else [Path(sysconfig.get_paths()["stdlib"])]


def natural_pool(roots: list[Path], limit: int, seed: int) -> tuple[list[dict], dict]:
    """Every top-level documented function under `roots` as an exercise record; a seeded sample of `limit`."""
    records, skipped, files = [], {}, 0
    for root in roots:
        if not root.exists():
            raise ConfigError(f"controls.natural_roots: {root} does not exist")
        for path in iter_python_files(root):
            reason = skip_reason(path, root) if root.is_dir() else None
            if reason:
                skipped[reason] = skipped.get(reason, 0) + 1
                continue
            files += 1
            rel = path.relative_to(root).as_posix() if root.is_dir() else path.name
            for snip in extract_functions(path.read_text(encoding="utf-8", errors="replace"), rel):
                records.append({"id": "natural-" + sha256_text(f"{rel}:{snip.name}:{snip.source}")[:16],
                                "kind": "exercise", "parsed": exercise_parsed(snip), "model": "natural",
                                "source": {"root": root.name, "path": rel, "line": snip.lineno},
                                "attributes": {"topic": rel.split("/")[0].removesuffix(".py")}})
    found = len(records)
    records = sorted({r["id"]: r for r in records}.values(), key=lambda r: r["id"])  # same function twice: once
    if limit and len(records) > limit:
        random.Random(f"natural:{seed}").shuffle(records)
        records = sorted(records[:limit], key=lambda r: r["id"])
    return records, {"roots": [str(r) for r in roots], "files": files, "skipped_files": dict(sorted(skipped.items())),
                     "functions_found": found, "sampled": len(records)}


def run_controls(cfg: RunConfig, config_path: Path, progress: bool = True) -> dict:
    """The stage's core: writes the arm's pool and returns its stats (also in stats.json)."""
    cc = cfg.controls
    t0 = time.monotonic()
    out_dir = Path(cc.output_dir) / cc.arm / "pool"
    out_dir.mkdir(parents=True, exist_ok=True)
    write_resolved_config(cfg, configs_dir(config_path), "controls", out_dir)
    if cc.arm == "rejected":
        records, info = rejected_pool(Path(cc.rejected_input))
    else:
        records, info = natural_pool(natural_roots(cc.natural_roots), cc.natural_max, cfg.seed)
    write_jsonl(out_dir / "exercises.jsonl", records)
    write_jsonl(out_dir / "textbooks.jsonl", [])
    stats = ControlsStats.parse({"arm": cc.arm, "records": len(records), **info, "wall_s": round(time.monotonic() - t0, 2)},
                                out_dir / "stats.json")
    stats.write(out_dir / "stats.json")
    return stats.dump()


def main(args) -> int:
    return stage_cli(run_controls, args, lambda s: {k: s[k] for k in ("arm", "records")})
