"""The whole pipeline, end to end, with `dvc repro` on the `ci` profile (real llama.cpp, real
sandbox, real QLoRA, real HumanEval), then the checks a user would make on its outputs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

from .conftest import REPO

STAGES = ["generate", "filter", "dedupe", "decontaminate", "finetune", "evaluate", "report"]


def dvc(project: Path, *args: str, timeout: int = 1800) -> subprocess.CompletedProcess:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=project, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_dvc_repro_end_to_end_on_the_ci_profile(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    for name in ("pipeline", "configs", "prompts", "dataset_cards", "eval"):
        shutil.copytree(REPO / name, project / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(REPO / name, project / name)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["profile"] = "ci"
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    assert dvc(project, "init", "--no-scm", "-q").returncode == 0

    done = dvc(project, "repro")
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    for stage in STAGES:
        assert f"Running stage '{stage}'" in done.stdout, stage

    metrics = json.loads((project / "eval/metrics.json").read_text())
    he = metrics["humaneval"]
    assert he["problems"] == 4 and "first 4 of 164" in he["subset"]
    for model in ("base", "finetuned"):
        assert 0.0 <= he[model]["pass@1"] <= 1.0
    assert abs(he["delta"]["pass@1"] - (he["finetuned"]["pass@1"] - he["base"]["pass@1"])) < 1e-6
    assert he["sanity"]["canonical_pass_rate"] == 1.0 and he["sanity"]["isolation"] == "bwrap"

    # The report is generated from those metrics and the stages' stats, and agrees with them.
    report = (project / "eval/report.md").read_text()
    assert "generated" in report.lower() and "phi-1" in report and "50.6" in report
    for model in ("base", "finetuned"):
        assert f"{100 * he[model]['pass@1']:.1f}" in report, model
    gen = json.loads((project / "data/generate/stats.json").read_text())
    assert str(gen["requested"]) in report
    html = (project / "eval/report.html").read_text()
    assert "data:image/png;base64," in html
    assert all((project / "eval/plots" / f).is_file() for f in ("pass_at_1.png", "loss.png", "funnel.png"))

    # The dataset and its card, and the fine-tuned adapter the evaluation used.
    rows = (project / "data/dataset/train.jsonl").read_text().splitlines()
    card = (project / "dataset_cards/README.md").read_text()
    assert rows and f"{len(rows)}" in card
    ft = json.loads((project / "data/finetune/metrics.json").read_text())
    assert ft["steps"] == 3 and (project / "data/finetune/adapter.gguf").stat().st_size > 0

    # dvc sees the declared metrics, and a second repro re-runs nothing, fast.
    shown = dvc(project, "metrics", "show", "--json")
    assert shown.returncode == 0 and "humaneval" in shown.stdout
    t0 = time.monotonic()
    again = dvc(project, "repro")
    elapsed = time.monotonic() - t0
    assert again.returncode == 0 and "Running stage" not in again.stdout, again.stdout
    assert elapsed < 10, elapsed
