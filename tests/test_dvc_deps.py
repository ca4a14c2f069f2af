"""dvc.yaml's deps cover what each stage runs: its whole import closure inside `pipeline`, the
modules it starts as subprocesses (`python -m pipeline....`), and the data it reads, so an edit to
any of them makes `dvc repro` run the stage again instead of "didn't change, skipping".

    pytest tests/test_dvc_deps.py -q
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "pipeline"
MODULE_STRING = re.compile(r"^pipeline(\.\w+)+$")


def module_file(name: str) -> Path | None:
    """The file of module `pipeline.a.b` (a module or a package's __init__), or None."""
    base = REPO.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_names(path: Path) -> set[str]:
    """Modules `path` imports (at any depth, lazy ones too) or names as a string (`-m pipeline.x`)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)  # `from pkg import submodule`
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and MODULE_STRING.match(node.value):
            out.add(node.value)
    return {n for n in out if n == "pipeline" or n.startswith("pipeline.")}


def closure(*roots: str) -> set[Path]:
    """Every file of the package that importing (or running) `roots` executes, parents' __init__ included."""
    seen: set[Path] = set()
    todo = list(roots)
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__ and a/b/__init__ first
            path = module_file(".".join(parts[:i]))
            if path is not None and path not in seen:
                seen.add(path)
                todo.extend(imported_names(path))
    return seen


def stage_closure(stage: str) -> set[Path]:
    # `textbook <stage>` is pipeline.cli, which imports pipeline.stages.<stage> by name.
    return closure("pipeline.cli", f"pipeline.stages.{stage}")


def dvc_stages() -> dict[str, dict]:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def covered(path: Path, deps: list[str]) -> bool:
    rel = path.relative_to(REPO)
    return any(rel == Path(d) or Path(d) in rel.parents for d in deps)


ON_DEMAND = {"topics"}  # run by hand (`textbook topics`): its output is a committed, versioned prompts file


def test_every_stage_module_is_a_dvc_stage():
    modules = {p.stem if p.suffix == ".py" else p.name for p in (PACKAGE / "stages").iterdir()
               if not p.name.startswith("_") and (p.suffix == ".py" or p.is_dir())}
    # A stage module may run as several DVC stages (the control arms run dedupe and decontaminate again).
    assert modules - ON_DEMAND == {spec["cmd"].split()[1] for spec in dvc_stages().values()}


@pytest.mark.parametrize("stage", sorted(dvc_stages()))
def test_deps_cover_the_import_closure(stage):
    spec = dvc_stages()[stage]
    program, module = spec["cmd"].split()[:2]
    assert program == "textbook" and (stage == module or stage.startswith(("controls_", f"{module}_")))
    files = stage_closure(module)
    assert module_file(f"pipeline.stages.{module}") in files
    missing = sorted(str(p.relative_to(REPO)) for p in files if not covered(p, spec["deps"]))
    assert not missing, f"dvc.yaml stage {stage!r} runs {missing} but its deps do not cover them"


def test_closure_sees_lazy_imports_and_subprocess_modules():
    files = {str(p.relative_to(REPO)) for p in stage_closure("evaluate")}
    # evaluate imports the student loader inside a function, and runs the llama.cpp server as `-m`.
    assert {"pipeline/engines/student.py", "pipeline/engines/llamacpp_server.py",
            "pipeline/sandbox/worker.py", "pipeline/core/schema.py"} <= files
    assert not any(f.startswith("pipeline/stages/generate") for f in files)


# ---------------------------------------------------------------------------------------
# The same, as a user sees it: edit a file, ask `dvc status`
# ---------------------------------------------------------------------------------------


def _dvc(project: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    dvc = shutil.which("dvc") or str(Path(sys.executable).with_name("dvc"))
    proc = subprocess.run([dvc, *args], cwd=project, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def _changed_stages(project: Path) -> set[str]:
    out = _dvc(project, "status", "--json").stdout
    return set(yaml.safe_load(out) or {})


@pytest.fixture(scope="module")
def scratch_project(tmp_path_factory) -> Path:
    """A copy of the project whose stages are all committed as up to date (outputs are stand-ins)."""
    project = tmp_path_factory.mktemp("dvcproj")
    for name in ("pipeline", "configs", "prompts"):
        shutil.copytree(REPO / name, project / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(REPO / name, project / name)
    _dvc(project, "init", "--no-scm", "-q")
    for spec in dvc_stages().values():
        for item in [*spec.get("deps", []), *spec.get("outs", []), *spec.get("metrics", [])]:
            rel = next(iter(item)) if isinstance(item, dict) else item
            path = project / rel
            if path.exists():
                continue
            if Path(rel).suffix:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(f"stand-in for {rel}\n")
            else:
                path.mkdir(parents=True)
                (path / "stand-in.txt").write_text(f"stand-in for {rel}\n")
    _dvc(project, "commit", "-f", "-q")
    assert _changed_stages(project) == set()
    return project


def _edit(path: Path):
    original = path.read_text()
    path.write_text(original + "\n# edited\n")
    return original


@pytest.mark.slow
@pytest.mark.parametrize("edited, expected", [
    ("pipeline/core/records.py", "all"),
    ("pipeline/cli.py", "all"),
    # dedupe and decontaminate also curate the rejected control arm and the natural corpus.
    ("pipeline/stages/dedupe/lsh.py", {"dedupe", "controls_rejected_dedupe", "dedupe_corpus"}),
    ("pipeline/stages/decontaminate/card.py",
     {"decontaminate", "controls_rejected_decontaminate", "decontaminate_corpus"}),
    ("pipeline/engines/servers.py", {"generate", "pretrain", "finetune", "evaluate", "corpus_extract", "corpus",
                                     "decontaminate", "controls_rejected_decontaminate", "decontaminate_corpus"}),
    ("pipeline/sandbox/worker.py", {"generate", "filter", "decontaminate", "evaluate",
                                    "controls_rejected_decontaminate", "decontaminate_corpus"}),
])
def test_dvc_status_after_an_edit(scratch_project, edited, expected):
    path = scratch_project / edited
    original = _edit(path)
    try:
        changed = _changed_stages(scratch_project)
    finally:
        path.write_text(original)
    assert changed == (set(dvc_stages()) if expected == "all" else expected)
    assert _changed_stages(scratch_project) == set()
