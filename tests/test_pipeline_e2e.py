"""The whole pipeline, end to end, with `dvc repro` on the `ci` profile (real llama.cpp, real
sandbox, real QLoRA, real HumanEval) in a git + DVC project like a user's clone, then the checks a
user would make on its outputs, then an experiment that swaps the student model."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from .conftest import REPO

STAGES = ["generate", "filter", "dedupe", "decontaminate", "finetune", "evaluate", "report"]


def dvc(project: Path, *args: str, timeout: int = 1800) -> subprocess.CompletedProcess:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=project, env=env, capture_output=True,
                          text=True, timeout=timeout)


def git(project: Path, *args: str) -> str:
    done = subprocess.run(["git", *args], cwd=project, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def experiments(shown: list[dict]) -> dict[str, dict]:
    """`dvc exp show --json` flattened: name (or "workspace"/branch) -> its params and metrics."""
    out = {}
    for node in shown:
        out[node.get("name") or node["rev"]] = node["data"]
        for exp in node.get("experiments") or []:
            out[exp["name"]] = exp["revs"][0]["data"]
    return out


@pytest.mark.slow
def test_dvc_repro_end_to_end_on_the_ci_profile(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    for name in ("pipeline", "configs", "prompts", "dataset_cards", "eval"):
        shutil.copytree(REPO / name, project / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", "params.yaml", ".gitignore"):
        shutil.copy(REPO / name, project / name)
    # The committed natural control arm: a plain dependency of finetune, mined once (tools/mine_natural.sh).
    shutil.copytree(REPO / "data" / "controls" / "natural", project / "data" / "controls" / "natural")
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["profile"] = "ci"
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    git(project, "init", "-q")
    git(project, "config", "user.email", "ci@example.invalid")
    git(project, "config", "user.name", "ci")
    assert dvc(project, "init", "-q").returncode == 0
    git(project, "add", "-A")
    git(project, "commit", "-qm", "project")

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

    # dvc sees the declared metrics, and a second repro re-runs nothing: every stage is up to date.
    shown = dvc(project, "metrics", "show", "--json")
    assert shown.returncode == 0 and "humaneval" in shown.stdout
    plots = dvc(project, "plots", "show", "--json")
    assert plots.returncode == 0, plots.stderr
    for declared in ("loss.tsv", "pass_at_1.csv", "funnel.csv"):
        assert declared in plots.stdout, declared
    again = dvc(project, "repro")
    assert again.returncode == 0 and "Running stage" not in again.stdout, again.stdout
    for stage in STAGES:
        assert f"Stage '{stage}' didn't change, skipping" in again.stdout, stage

    # The run is committed as a user would: the small metrics are in git, caches and checkpoints not.
    git(project, "add", "-A")
    git(project, "commit", "-qm", "baseline run")
    tracked = git(project, "ls-files").splitlines()
    assert {"dvc.lock", "data/finetune/metrics.json", "data/generate/stats.json", "eval/metrics.json"} <= set(tracked)
    assert not [f for f in tracked if f.startswith(("data/cache/", "data/eval_cache/", "data/finetune/checkpoints/"))]
    assert not [f for f in tracked if f.endswith((".gguf", ".safetensors", "exercises.jsonl"))]

    # Swap the student in one experiment: the curated data is reused, only its dependants re-run.
    exp = dvc(project, "exp", "run", "-n", "smollm2-student", "-S", "++finetune.student=smollm2-135m-instruct")
    assert exp.returncode == 0, exp.stdout[-4000:] + exp.stderr[-4000:]
    for stage in STAGES[:4]:
        assert f"Stage '{stage}' didn't change, skipping" in exp.stdout, stage
        assert f"Running stage '{stage}'" not in exp.stdout, stage
    for stage in STAGES[4:]:
        assert f"Running stage '{stage}'" in exp.stdout, stage

    # `dvc exp show` lists the baseline and the experiment side by side, each with its student.
    shown = dvc(project, "exp", "show", "--json")
    assert shown.returncode == 0, shown.stderr
    rows = experiments(json.loads(shown.stdout))
    assert "smollm2-student" in rows, list(rows)
    students = {}
    for name, data in rows.items():
        he_row = data["metrics"]["eval/metrics.json"]["data"]["humaneval"]
        ft_row = data["metrics"]["data/finetune/metrics.json"]["data"]
        assert he_row["presets"]["student"] == ft_row["student"], name
        assert 0.0 <= he_row["finetuned"]["pass@1"] <= 1.0
        students[name] = he_row["presets"]["student"]
    assert students["smollm2-student"] == "smollm2-135m-instruct"
    baseline = [n for n in rows if n not in ("workspace", "smollm2-student")]
    assert baseline and all(students[n] == "gemma-3-270m" for n in baseline), students
    exp_params = rows["smollm2-student"]["params"]["params.yaml"]["data"]
    assert exp_params["finetune"]["student"] == "smollm2-135m-instruct"

    # `dvc metrics diff` compares the two runs; the report in the workspace is the experiment's.
    diff = dvc(project, "metrics", "diff", "HEAD", "smollm2-student", "--json")
    assert diff.returncode == 0, diff.stderr
    changed = json.loads(diff.stdout)["eval/metrics.json"]["humaneval.presets.student"]
    assert (changed["old"], changed["new"]) == ("gemma-3-270m", "smollm2-135m-instruct")
    assert "`smollm2-135m-instruct`" in (project / "eval/report.md").read_text()
