"""The GPU path's code, run on the CPU: the in-process engine's batched generation and the freeing
of its memory, the activation checkpointing fields of the installed transformers, a sharded FSDP checkpoint
met without FSDP, and the pretrain sampler under FSDP. What needs a GPU is in docs/gpu.md."""

from __future__ import annotations

import dataclasses
import json
import logging
import weakref

import pytest

from pipeline.core.config import ConfigError, FinetuneConfig
from pipeline.engines.llm import LLMRequest


def _requests(problems: int, stop: list[str] | None, max_tokens: int = 10) -> list[LLMRequest]:
    from pipeline.core.humaneval import load_problems

    greedy = {"max_tokens": max_tokens, "temperature": 0.0, "top_p": 0.95, "stop": stop, "seed": 1}
    out = [LLMRequest(p["task_id"], prompt=p["prompt"], params=greedy) for p in load_problems(problems)]
    sampled = {**greedy, "temperature": 0.8, "seed": 7}  # decoded alone, with its own seed
    return out + [LLMRequest("sampled", prompt=out[0].prompt, params=sampled)]


def test_batched_in_process_generation_reads_as_one_request_at_a_time(tiny_dir):
    """What the GPU does (batches of greedy requests, left-padded), on the CPU in fp32: each completion, its
    token count and finish reason are those of the request decoded alone."""
    from pipeline.engines.student import InProcessModel

    stop = ["e"]  # random tokens complete it often: rows stop mid-batch, others run to max_tokens
    requests = _requests(5, stop, max_tokens=8)
    with InProcessModel(str(tiny_dir), batch_size=1) as alone:
        one = alone.complete_many(requests)
    seen = []
    with InProcessModel(str(tiny_dir), batch_size=4) as batched:
        assert batched.dtype.is_floating_point and batched.device == "cpu"
        many = batched.complete_many(requests, on_result=lambda i, r: seen.append(i))
    assert many == one and sorted(seen) == list(range(len(requests)))
    # Both kinds of row: cut at the cap, and stopped early inside a batch that went on.
    assert {c[0]["finish_reason"] for c, _ in one} == {"length", "stop"}
    assert len({u["completion_tokens"] for _, u in one}) > 1


def test_closing_the_in_process_model_frees_it(tiny_dir):
    """Evaluate closes it before any vLLM server or the likelihood scorer starts: the weights must really go."""
    from pipeline.engines.student import InProcessModel

    model = InProcessModel(str(tiny_dir))
    weights = weakref.ref(next(model.model.parameters()))
    model.close()
    assert model.model is None and weights() is None


def test_training_arguments_use_the_checkpointing_fields_this_transformers_has(tmp_path):
    """transformers 5.23 renamed gradient_checkpointing to activation_checkpointing; the GPU install's transformers
    (constraints-gpu.txt) is older. Whichever this one is, TrainingArguments accepts the arguments and enables it."""
    import torch
    from transformers import TrainingArguments

    from pipeline.engines.training import checkpointing_arguments, training_arguments

    fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    kwargs = checkpointing_arguments(True)
    assert set(kwargs) <= fields and len(kwargs) == 2
    args = training_arguments(FinetuneConfig(), tmp_path, 0, "cpu", torch.float32, False, False)
    name = next(iter(kwargs))
    assert getattr(args, name) is True and getattr(args, f"{name}_kwargs") == {"use_reentrant": False}


def _finished_checkpoint(folder, sharded: bool):
    folder.mkdir(parents=True)
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": 3, "max_steps": 3, "log_history": []}))
    if sharded:  # what the Trainer writes under fsdp_qlora.yaml's SHARDED_STATE_DICT: no adapter file
        (folder / "pytorch_model_fsdp_0").mkdir()
        (folder / "pytorch_model_fsdp_0" / "__0_0.distcp").write_bytes(b"part")
    return folder


def test_a_finished_sharded_fsdp_checkpoint_outside_fsdp_is_a_clear_error(tmp_path, tiny_dir):
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    from pipeline.engines.training import sharded_checkpoint, train_or_restore

    sharded = _finished_checkpoint(tmp_path / "checkpoints/checkpoint-3", sharded=True)
    assert sharded_checkpoint(sharded)
    assert not sharded_checkpoint(_finished_checkpoint(tmp_path / "plain/checkpoint-3", sharded=False))
    trainer = Trainer(model=AutoModelForCausalLM.from_pretrained(tiny_dir),
                      args=TrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none"))
    # Before: FileNotFoundError for adapter_model.safetensors / model.safetensors.
    with pytest.raises(ConfigError, match=r"saved under FSDP .*`accelerate launch --config_file "
                                          r"configs/accelerate/fsdp_qlora.yaml`"):
        train_or_restore(trainer, sharded)


def test_no_samples_under_fsdp_and_the_log_says_why(tmp_path, monkeypatch, caplog, tok):
    from pipeline.engines.training import Sampler, sample_callbacks

    sampler = Sampler(["def f():"], 10, 8, tmp_path / "pretrain/samples.jsonl")
    assert len(sample_callbacks(sampler, tok, True, "pretrain")) == 1 and not sampler.path.exists()
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch` exports under fsdp_qlora.yaml
    with caplog.at_level(logging.WARNING):
        assert sample_callbacks(sampler, tok, True, "pretrain") == []
    assert sampler.path.read_text() == "" and "no sample completions under FSDP" in caplog.text
