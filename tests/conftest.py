"""Shared fixtures: a throwaway project folder and a fault-injecting OpenAI server."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from tests.fakeserver import FakeOpenAIServer

REPO = Path(__file__).resolve().parents[1]


def kill_when_saved(proc: subprocess.Popen, folder: Path, pattern: str, count: int, timeout: float = 120) -> dict:
    """SIGKILL `proc` once `count` files match `pattern` under `folder` (a stage's completion
    markers); the markers then present, name -> mtime."""
    deadline = time.monotonic() + timeout
    while len(list(folder.glob(pattern))) < count and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return {p.name: p.stat().st_mtime_ns for p in folder.glob(pattern)}


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


@pytest.fixture(scope="session")
def smol_folder() -> Path:
    """SmolLM2-135M's HF folder, dequantized once from the GGUF in its PyPI package."""
    from pipeline.core.config import load_preset
    from pipeline.engines.student import model_source

    return Path(model_source(load_preset("smollm2-135m-instruct", REPO / "configs")))


@pytest.fixture(scope="session")
def tok(smol_folder):
    from pipeline.engines.student import load_tokenizer

    return load_tokenizer(str(smol_folder))


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, smol_folder, tok) -> Path:
    """A 2-layer, 64-wide Llama with random weights and SmolLM2's tokenizer: real code paths,
    seconds per run. Sizes are multiples of 32 so its 4-bit layers run on CPU."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
