"""The GPU install: constraints-gpu.txt resolves against PyPI with the project's own requirements,
at versions the code supports, without the CPU-only pieces; `make install-gpu` runs what docs/gpu.md says;
the check it ends with refuses a CPU torch; the GPU check always leaves one JSON object."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from .conftest import REPO

# The packages whose GPU pins differ from constraints.txt's: vLLM pins torch and caps transformers.
GPU_OVERRIDES = {"torch", "transformers"}


def pins(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", line
            out[canonicalize_name(req.name)] = spec.version
    return out


def project_requirements(extras: tuple[str, ...]) -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    for extra in extras:
        reqs += [Requirement(r) for r in project["optional-dependencies"][extra]]
    return reqs


GPU = pins(REPO / "constraints-gpu.txt")
CPU = pins(REPO / "constraints.txt")


def test_gpu_constraints_agree_with_the_cpu_ones_and_meet_the_floors():
    assert {"vllm", "torch", "transformers", "peft", "bitsandbytes", "accelerate"} <= set(GPU)
    differ = {name for name in set(GPU) & set(CPU) if GPU[name] != CPU[name]}
    assert differ == GPU_OVERRIDES, "pins other than vLLM's torch/transformers drifted from constraints.txt"
    assert set(CPU) - set(GPU) == {"llama-cpp-python"}  # the one CPU-only dependency
    for req in project_requirements(("dev", "gpu")):
        name = canonicalize_name(req.name)
        if name in GPU:
            assert req.specifier.contains(GPU[name], prereleases=True), f"{name}=={GPU[name]} breaks pyproject's {req}"
    names = {canonicalize_name(r.name) for r in project_requirements(("dev", "gpu"))}
    assert "llama-cpp-python" not in names  # compiled from source: out of the GPU install's way
    assert "llama-cpp-python" in {canonicalize_name(r.name) for r in project_requirements(("llamacpp",))}


def _make_n(target: str, venv: Path) -> str:
    done = subprocess.run(["make", "-n", target, f"VENV={venv}"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_make_install_gpu_and_install_run_what_the_docs_say(tmp_path):
    venv = tmp_path / "venv"
    gpu = _make_n("install-gpu", venv).splitlines()
    install = next(i for i, line in enumerate(gpu) if "-c constraints-gpu.txt" in line)
    assert gpu[install].endswith('install -q -c constraints-gpu.txt -e ".[dev,gpu]"')
    removal = next(i for i, line in enumerate(gpu) if "uninstall -q -y torch" in line)
    assert removal < install  # a CPU torch goes before pip could keep it
    assert gpu[install + 1].endswith("python tools/gpu_install_check.py")
    cpu = _make_n("install", venv)
    assert '-c constraints.txt --extra-index-url https://download.pytorch.org/whl/cpu "torch==2.13.0+cpu"' in cpu
    assert '-e ".[dev,llamacpp]"' in cpu
    assert "--extra-index-url" not in subprocess.run(  # TORCH_INDEX= : torch from pip's own configuration
        ["make", "-n", "install", f"VENV={venv}", "TORCH_INDEX="], cwd=REPO, capture_output=True, text=True).stdout


def test_the_install_check_refuses_a_cpu_torch():
    """tools/gpu_install_check.py, which `make install-gpu` ends with, on this CPU venv: the CPU-only torch is
    named, with the fix, and so is every package that is not at its GPU pin."""
    import torch

    if torch.version.cuda is not None:
        pytest.skip("this torch is a CUDA build")
    done = subprocess.run([sys.executable, "tools/gpu_install_check.py"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 1
    assert f"torch {torch.__version__} is a CPU-only build" in done.stderr and "pip uninstall -y torch" in done.stderr
    assert f"transformers {CPU['transformers']} is installed, constraints-gpu.txt pins {GPU['transformers']}" in done.stderr


def _pypi_reachable() -> bool:
    import httpx

    try:
        return httpx.head("https://pypi.org/simple/vllm/", timeout=10, follow_redirects=True).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.mark.slow
def test_the_gpu_install_resolves_against_pypi_at_the_pinned_versions(tmp_path):
    """`pip install --dry-run --report` of what `make install-gpu` installs, against PyPI alone (this machine's
    pip configuration, find-links and global constraints left out, as on a user's). --use-feature=fast-deps reads
    each wheel's metadata with HTTP range requests: the multi-GB CUDA wheels are not downloaded (about 1.5 min)."""
    if not _pypi_reachable():
        pytest.skip("PyPI is not reachable")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_") or k == "PIP_CERT"}
    env["PIP_CONFIG_FILE"] = os.devnull
    report = tmp_path / "report.json"
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--use-feature=fast-deps",
           "--no-cache-dir", "--disable-pip-version-check", "--quiet", "--report", str(report),
           "-c", "constraints-gpu.txt", "-e", ".[dev,gpu]"]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    installs = json.loads(report.read_text())["install"]
    resolved = {canonicalize_name(i["metadata"]["name"]): i for i in installs}
    versions = {name: i["metadata"]["version"] for name, i in resolved.items()}
    for name, version in GPU.items():
        assert versions[name] == version, f"{name}: resolved {versions[name]}, pinned {version}"
    # The project's own floors, and vLLM's own requirements, hold for what was resolved.
    for req in project_requirements(("dev", "gpu")) + [
            Requirement(r) for r in resolved["vllm"]["metadata"]["requires_dist"] if "extra ==" not in r]:
        name = canonicalize_name(req.name)
        if name in versions and (req.marker is None or req.marker.evaluate()):
            assert req.specifier.contains(versions[name], prereleases=True), f"{name} {versions[name]} vs {req}"
    assert "llama-cpp-python" not in versions
    # PyPI's torch for Linux x86_64 is the CUDA build: it brings the CUDA runtime wheel.
    assert "+" not in versions["torch"] and any(n.startswith("nvidia-cuda-runtime") for n in versions)
    assert resolved["torch"]["download_info"]["url"].startswith("https://files.pythonhosted.org/")


def test_the_gpu_check_leaves_one_json_object_even_when_it_dies(tmp_path):
    """bench/gpu_check.sh: gpu_check.py killed before its JSON line (here: an argument it refuses) still leaves
    one JSON object, with the exit code and the log's tail."""
    env = {**os.environ, "OUT": str(tmp_path), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    done = subprocess.run(["bash", "bench/gpu_check.sh", "--steps", "many"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 2
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert re.search(r"exited with code 2 before writing its JSON line", report["error"])
    assert "invalid int value: 'many'" in report["log_tail"]
