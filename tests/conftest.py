"""Shared fixtures: a throwaway project folder and a fault-injecting OpenAI server."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from tests.fakeserver import FakeOpenAIServer

REPO = Path(__file__).resolve().parents[1]


def make_project(root: Path, params: dict) -> Path:
    """A project folder like the repo's: prompts/, configs/ and a params.yaml."""
    for name in ("prompts", "configs"):
        shutil.copytree(REPO / name, root / name, dirs_exist_ok=True)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return root


def add_preset(root: Path, name: str, **fields) -> None:
    (root / "configs" / "models" / f"{name}.yaml").write_text(yaml.safe_dump(fields))


def fake_params(n_exercises: int = 12, n_textbooks: int = 3, **client) -> dict:
    return {
        "profile": "ci",
        "seed": 7,
        "generate": {
            "teacher": "fake",
            "n_exercises": n_exercises,
            "n_textbooks": n_textbooks,
            "client": {"concurrency": 4, "backoff_base_s": 0.01, "backoff_max_s": 0.2, **client},
        },
    }


@pytest.fixture
def project(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return make_project(tmp_path, fake_params())


@pytest.fixture
def fake_server():
    with FakeOpenAIServer() as srv:
        yield srv


@pytest.fixture
def fake_project(project, fake_server):
    add_preset(project, "fake", engine="remote", model="fake-model", api="chat", base_url=fake_server.base_url,
               price={"prompt_per_mtok": 1.0, "completion_per_mtok": 2.0})
    return project
