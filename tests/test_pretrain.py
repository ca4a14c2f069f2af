"""Phase 1 (pretrain) in its three modes, and phase 2 (finetune) starting from it, on tiny real models."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from pipeline.core.config import ConfigError, load_config
from pipeline.core.records import write_jsonl
from pipeline.stages.finetune import run_finetune
from pipeline.stages.pretrain import run_pretrain

from .test_finetune import dataset, ft_project, read_tsv

pytestmark = pytest.mark.slow


def project(root: Path, tiny: Path, pretrain: dict | None = None, **finetune) -> Path:
    params, _ = ft_project(root, tiny, **finetune)
    text = params.read_text()
    cfg = {"enabled": True, "max_steps": 4, "max_length": 64, "learning_rate": 1e-3, "sample_steps": 2,
           "sample_tokens": 6, "output_dir": str(root / "pre"), **(pretrain or {})}
    params.write_text(text + "pretrain: " + json.dumps(cfg) + "\n")
    return params


def pre(params: Path, *overrides: str, callbacks: list | None = None) -> dict:
    return run_pretrain(load_config(params, list(overrides)), params, progress=False, callbacks=callbacks)


def fine(params: Path, *overrides: str) -> dict:
    return run_finetune(load_config(params, list(overrides)), params, progress=False)


def adapter_tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(folder / "adapter_model.safetensors")


def test_lora_phase_then_exercises_continue_the_same_adapter(tmp_path, monkeypatch, tiny_dir):
    monkeypatch.chdir(tmp_path)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    write_jsonl(corpus / "more.jsonl", [{"id": "a", "text": "def double(x):\n    return 2 * x\n" * 3}])
    (corpus / "notes.md").write_text("# Loops\n\nA for loop visits every item of a list in order.\n")
    params = project(tmp_path, tiny_dir, {"extra_corpus": [str(corpus / "more.jsonl"), str(corpus / "notes.md")]},
                     kinds=["exercise"])
    m = pre(params)
    out = tmp_path / "pre"
    assert m["enabled"] and m["mode"] == "lora" and m["steps"] == 4 and m["records"] == {"dataset": 4, "extra_corpus": 2}
    assert m["examples"]["exercises"] == 0 and m["examples"]["textbooks"] == 6  # textbooks + corpus, every token
    assert (out / "weights/adapter/adapter_model.safetensors").is_file() and (out / "weights/adapter.gguf").is_file()
    assert json.loads((out / "metrics.json").read_text()) == m
    assert [s for s, _ in read_tsv(out / "dvclive/plots/metrics/train/loss.tsv")] == [1, 2, 3, 4]
    samples = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert sorted({s["step"] for s in samples}) == [2, 4] and len(samples) == 2 * 3
    assert all(isinstance(s["completion"], str) for s in samples)

    f = fine(params)
    assert f["init_adapter"] == str(out / "weights/adapter") and f["phase_one"] == "pretrain-lora"
    assert f["examples"]["exercises"] + f["examples"].get("textbooks", 0) == 20 and f["examples"]["textbooks"] == 0
    phase1, phase2 = adapter_tensors(out / "weights/adapter"), adapter_tensors(tmp_path / "out/adapter")
    assert phase1.keys() == phase2.keys()  # one adapter, trained further
    assert any(not torch.equal(phase1[k], phase2[k]) for k in phase1)
    # From the base instead (phase 1 off): another adapter; phase 1's output is then only a marker.
    off = fine(params, "pretrain.enabled=false", f"finetune.output_dir={tmp_path / 'out-off'}")
    assert off["init_adapter"] is None and off["phase_one"] is None
    scratch_b = adapter_tensors(tmp_path / "out-off/adapter")
    assert any(not torch.equal(scratch_b[k], phase2[k]) for k in phase2)
    assert pre(params, "pretrain.enabled=false") == {"enabled": False}
    assert sorted(p.name for p in (out / "weights").iterdir()) == ["DISABLED"]
    assert (out / "samples.jsonl").read_text() == "" and (out / "dvclive").is_dir()


def test_textbooks_only_passes_phase_one_through(tmp_path, monkeypatch, tiny_dir):
    monkeypatch.chdir(tmp_path)
    params = project(tmp_path, tiny_dir, {"sample_steps": 0})
    with pytest.raises(ConfigError, match="finetune.enabled=false passes phase 1's adapter through"):
        fine(params, "finetune.enabled=false", "pretrain.enabled=false")
    with pytest.raises(ConfigError, match="does not exist: run `textbook pretrain` first"):
        fine(params, "finetune.enabled=false")
    pre(params)
    m = fine(params, "finetune.enabled=false")
    assert m["enabled"] is False and m["steps"] == 0
    assert (tmp_path / "out/adapter.gguf").read_bytes() == (tmp_path / "pre/weights/adapter.gguf").read_bytes()


def test_scratch_model_learns_and_a_killed_run_resumes_to_the_same_weights(tmp_path, monkeypatch, tiny_dir):
    """A 2-layer llama from random weights with SmolLM2's tokenizer; crash after the step-4 checkpoint."""
    from safetensors.torch import load_file
    from transformers import TrainerCallback

    class Crash(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.global_step == 5 and "loss" in (logs or {}):
                raise KeyboardInterrupt("simulated kill")

    monkeypatch.chdir(tmp_path)
    shape = {"mode": "scratch", "max_steps": 6, "learning_rate": 3e-3, "kinds": ["textbook", "exercise"],
             "scratch": {"family": "llama", "hidden_size": 64, "layers": 2, "heads": 4, "intermediate_size": 128,
                         "context": 128}}
    ref_params = project(tmp_path / "ref", tiny_dir, shape, save_steps=2)
    ref = pre(ref_params)
    assert ref["mode"] == "scratch" and ref["architecture"] == "llama" and ref["steps"] == 6
    losses = [v for _, v in read_tsv(tmp_path / "ref/pre/dvclive/plots/metrics/train/loss.tsv")]
    assert losses[-1] < losses[0]  # it learns
    model_dir = tmp_path / "ref/pre/weights/model"
    assert (model_dir / "config.json").is_file() and (model_dir / "tokenizer.json").is_file()
    assert json.loads((model_dir / "config.json").read_text())["num_hidden_layers"] == 2

    params = project(tmp_path / "crash", tiny_dir, shape, save_steps=2)
    with pytest.raises(KeyboardInterrupt):
        pre(params, callbacks=[Crash()])
    shutil.rmtree(tmp_path / "crash/pre/dvclive")
    resumed = pre(params)
    assert resumed["resumed_from_step"] == 4 and resumed["steps"] == 6
    a = load_file(model_dir / "model.safetensors")
    b = load_file(tmp_path / "crash/pre/weights/model/model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)
    again = pre(params)  # finished: restored from the last checkpoint, nothing trained
    assert (again["resumed_from_step"], again["steps"]) == (6, 6)
    c = load_file(tmp_path / "crash/pre/weights/model/model.safetensors")
    assert all(torch.equal(b[k], c[k]) for k in b)

    # Phase 2 puts a new LoRA on the model phase 1 wrote (no GGUF base: plain LoRA).
    f = fine(ref_params, "finetune.quantization=none", "finetune.export_gguf=false")
    assert f["phase_one"] == "pretrain-scratch" and f["init_adapter"] is None and math.isfinite(f["train_loss"])
    assert json.loads((tmp_path / "ref/out/adapter/adapter_config.json").read_text())["base_model_name_or_path"] == \
        str(model_dir)


def test_full_mode_changes_every_weight_of_the_student(tmp_path, monkeypatch, tiny_dir):
    from safetensors.torch import load_file

    monkeypatch.chdir(tmp_path)
    params = project(tmp_path, tiny_dir, {"mode": "full", "max_steps": 2, "sample_steps": 0})
    m = pre(params)
    assert m["mode"] == "full" and m["trainable_params"] == m["total_params"]
    before = load_file(tiny_dir / "model.safetensors")
    after = load_file(tmp_path / "pre/weights/model/model.safetensors")
    changed = [k for k in before if not torch.equal(before[k], after[k].to(before[k].dtype))]
    assert len(changed) == len(before)


def test_bad_pretrain_config_names_the_key(tmp_path, monkeypatch, tiny_dir):
    monkeypatch.chdir(tmp_path)
    params = project(tmp_path, tiny_dir)
    with pytest.raises(ConfigError, match=r"pretrain.kinds: must be a non-empty subset"):
        load_config(params, ["pretrain.kinds=[lectures]"])
    with pytest.raises(ConfigError, match="pretrain.scratch.heads: must divide hidden_size"):
        load_config(params, ["pretrain.scratch.heads=3"])
    with pytest.raises(ConfigError, match="pretrain.mode: 'distill' is not allowed"):
        load_config(params, ["pretrain.mode=distill"])
    with pytest.raises(ConfigError, match="pretrain.extra_corpus: .*nowhere.jsonl does not exist"):
        pre(params, f"pretrain.extra_corpus=[{tmp_path / 'nowhere.jsonl'}]")
    (tmp_path / "bad.jsonl").write_text('{"text": ""}\n')
    with pytest.raises(ConfigError, match="bad.jsonl line 1: `text` is empty"):
        pre(params, f"pretrain.extra_corpus=[{tmp_path / 'bad.jsonl'}]")
    write_jsonl(tmp_path / "data/train.jsonl", [r for r in dataset() if r["kind"] == "exercise"])
    with pytest.raises(ConfigError, match=r"pretrain.kinds=\['textbook'\].*nothing to pretrain on"):
        pre(params)
    with pytest.raises(ConfigError, match=r"finetune.kinds: must be a non-empty subset"):
        load_config(params, ["finetune.kinds=[]"])
