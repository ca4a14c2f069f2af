"""Check a GPU install (`make install-gpu` runs it last): the CUDA build of torch, and every package that
constraints-gpu.txt pins at its pinned version. It needs no GPU (an install may be made on a build node);
it says whether torch sees one.

    .venv/bin/python tools/gpu_install_check.py      # exit 0: the install is the one docs/gpu.md describes

Why: a CPU torch already in the venv satisfies a bare `torch==X` pin when it is X+cpu, and pip keeps it;
training then runs on the CPU without a word. And vLLM starts as `python -m vllm.entrypoints.cli.main`
(pipeline/engines/servers.py), so that module must be importable by this Python.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
import sys
from pathlib import Path

CONSTRAINTS = Path(__file__).resolve().parent.parent / "constraints-gpu.txt"


def pins(path: Path = CONSTRAINTS) -> dict[str, str]:
    """name -> version of each `name==version` line."""
    out = {}
    for line in path.read_text().splitlines():
        m = re.match(r"^\s*([A-Za-z0-9_.\-]+)\s*==\s*([^\s;#]+)", line)
        if m:
            out[m.group(1).lower()] = m.group(2)
    return out


def problems() -> list[str]:
    found = []
    for name, want in pins().items():
        try:
            have = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found.append(f"{name} is not installed ({CONSTRAINTS.name} pins {want})")
            continue
        if have.split("+")[0] != want:
            found.append(f"{name} {have} is installed, {CONSTRAINTS.name} pins {want}")
    try:
        import torch
    except ImportError:
        return found + ["torch cannot be imported"]
    if torch.version.cuda is None:
        found.append(f"torch {torch.__version__} is a CPU-only build: training would run on the CPU. Reinstall it "
                     f"from PyPI: pip uninstall -y torch && pip install -c {CONSTRAINTS.name} torch")
    if importlib.util.find_spec("vllm") is not None and importlib.util.find_spec("vllm.entrypoints.cli.main") is None:
        found.append("vllm.entrypoints.cli.main is missing: servers.py starts vLLM through it")
    return found


def main() -> int:
    import torch

    bad = problems()
    for line in bad:
        print(f"error: {line}", file=sys.stderr)
    gpus = torch.cuda.device_count() if torch.version.cuda and torch.cuda.is_available() else 0
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), {gpus} GPU(s) visible; "
          f"{'OK' if not bad else f'{len(bad)} problem(s)'}")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
