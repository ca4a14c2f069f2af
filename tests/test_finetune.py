"""Finetune stage: data preparation, packing, QLoRA on a real student, resume, bad input."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch

from pipeline.core.config import ConfigError, load_config, load_preset
from pipeline.core.records import write_jsonl
from pipeline.engines.student import load_tokenizer, model_source
from pipeline.engines.training import (
    IGNORE,
    Collator,
    TrainingDiverged,
    forward_inputs,
    pack_examples,
    prepare_examples,
    resume_point,
    split_records,
    tokenize_record,
)
from pipeline.stages.finetune import run_finetune

from .conftest import REPO, add_preset, make_project

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")


def exercise(i: int, body_lines: int = 1) -> dict:
    prompt = f'def add_{i}(a: int, b: int) -> int:\n    """Return a + b + {i}."""'
    completion = "".join(f"    x{j} = a + {j}\n" for j in range(body_lines - 1)) + f"    return a + b + {i}\n"
    return {"id": f"ex-{i:03d}", "kind": "exercise", "text": prompt + "\n" + completion, "prompt": prompt,
            "completion": completion, "tests": f"assert add_{i}(1, 2) == {3 + i}", "topic": "arithmetic",
            "subtopic": "addition", "audience": "student", "difficulty": "easy", "model": "fake"}


def textbook(i: int) -> dict:
    text = f"Section {i}. A function maps inputs to outputs; `return` hands the result back to the caller.\n"
    return {"id": f"tb-{i:03d}", "kind": "textbook", "text": text, "prompt": "", "completion": "",
            "tests": "", "topic": "functions", "subtopic": "return", "audience": "student",
            "difficulty": "easy", "model": "fake"}


def dataset(n_ex: int = 20, n_tb: int = 4) -> list[dict]:
    return [exercise(i, body_lines=1 + i % 4) for i in range(n_ex)] + [textbook(i) for i in range(n_tb)]


# ---------------------------------------------------------------------------------------
# Fixtures: the real student's tokenizer, a tiny random-weight Llama sharing it, a project
# ---------------------------------------------------------------------------------------

SMOL = "smollm2-135m-instruct"


def ft_project(root: Path, tiny_dir: Path | None, rows: list[dict] | None = None,
               **finetune) -> tuple[Path, dict]:
    """A project folder with the dataset written and params for a short run."""
    params = {"profile": "ci", "seed": 7, "finetune": {
        "student": "tiny", "max_steps": 4, "save_steps": 2, "max_length": 64, "batch_size": 2,
        "learning_rate": 1e-3, "eval_fraction": 0.1, "output_dir": str(root / "out"),
        "dataset_dir": str(root / "data"), **finetune}}
    make_project(root, params)
    if tiny_dir is not None:
        add_preset(root, "tiny", engine="vllm", model="tiny", api="completions", hf_id=str(tiny_dir))
    (root / "data").mkdir(exist_ok=True)
    write_jsonl(root / "data" / "train.jsonl", dataset() if rows is None else rows)
    return root / "params.yaml", params


def run(params_path: Path, *overrides: str, callbacks: list | None = None) -> dict:
    cfg = load_config(params_path, list(overrides))
    return run_finetune(cfg, params_path, progress=False, callbacks=callbacks)


def ftcfg(**kw):
    from pipeline.core.config import FinetuneConfig

    return FinetuneConfig(**kw)


# ---------------------------------------------------------------------------------------
# Data preparation
# ---------------------------------------------------------------------------------------


def test_exercise_loss_is_on_the_solution_only(tok):
    rec = exercise(3, body_lines=2)
    ex = tokenize_record(rec, tok, completion_only=True)
    assert ex.input_ids[-1] == tok.eos_token_id
    target = tok.decode([t for t, lab in zip(ex.input_ids, ex.labels, strict=True) if lab != IGNORE])
    assert target.strip().startswith("x0 = a + 0") and "return a + b + 3" in target
    assert "Return a + b" not in target and "def add_3" not in target
    full = tokenize_record(rec, tok, completion_only=False)
    assert full.labels[1:] == full.input_ids[1:] and full.labels[0] == IGNORE
    tb = tokenize_record(textbook(1), tok, completion_only=True)  # textbooks: every token
    assert tb.labels[1:] == tb.input_ids[1:]


def test_long_examples_are_truncated_or_dropped_and_counted(tok):
    rows = [exercise(0, body_lines=40), exercise(1), textbook(0)]
    kept, stats = prepare_examples(rows, tok, ftcfg(max_length=32))
    assert stats.truncated >= 1 and stats.dropped_long == 0 and all(len(e.input_ids) <= 32 for e in kept)
    kept, stats = prepare_examples(rows, tok, ftcfg(max_length=32, drop_long=True))
    assert stats.dropped_long >= 1 and stats.truncated == 0 and len(kept) == 3 - stats.dropped_long
    # An exercise whose prompt alone fills max_length has no target left: dropped, counted.
    kept, stats = prepare_examples([exercise(2)], tok, ftcfg(max_length=16))
    assert (kept, stats.dropped_no_target) == ([], 1)
    # A long textbook section is read whole in max_length pieces when asked (pretrain always asks).
    whole = tokenize_record(textbook(0), tok, completion_only=True).input_ids
    kept, stats = prepare_examples([textbook(0)], tok, ftcfg(max_length=16, split_long_textbooks=True))
    assert stats.split == len(kept) - 1 >= 1 and stats.truncated == 0 and all(len(e.input_ids) <= 16 for e in kept)
    joined = [t for e in kept for t in e.input_ids]
    assert joined in (whole, whole[:-1])  # a last piece of one token predicts nothing: left out
    assert all(e.labels[0] == IGNORE and e.labels[1:] == e.input_ids[1:] for e in kept)


def test_split_is_seeded_disjoint_and_order_independent():
    rows = dataset(30, 5)
    train, held = split_records(rows, 0.2, seed=1)
    assert len(held) == 7 and {r["id"] for r in train}.isdisjoint({r["id"] for r in held})
    assert split_records(list(reversed(rows)), 0.2, seed=1) == (train, held)
    assert split_records(rows, 0.2, seed=2)[1] != held


def test_packing_does_not_attend_across_examples(tok, tiny_dir):
    """The packed row's loss equals the token-weighted mean of the examples' own losses:
    no attention across the boundary, no target spanning it."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    examples, _ = prepare_examples([exercise(1, 3), textbook(2), exercise(5, 2)], tok, ftcfg(max_length=256))
    rows = pack_examples(examples, max_length=256)
    assert len(rows) == 1 and rows[0]["position_ids"].count(0) == 3
    short = {k: v[:10] for k, v in rows[0].items()}  # a second, padded row
    packed = Collator(tok.pad_token_id, packed=True)(rows + [short])
    assert packed["position_ids"][1, 10:].tolist() == list(range(packed["input_ids"].shape[1] - 10))
    with torch.no_grad():
        logits = model(**forward_inputs({k: v for k, v in packed.items() if k != "labels"}, True)).logits[0]
        offset, total, n = 0, 0.0, 0
        for ex in examples:
            alone = model(input_ids=torch.tensor([ex.input_ids])).logits[0]
            torch.testing.assert_close(logits[offset:offset + len(ex.input_ids)], alone, atol=1e-4, rtol=1e-4)
            loss = model(input_ids=torch.tensor([ex.input_ids]), labels=torch.tensor([ex.labels])).loss
            k = sum(lab != IGNORE for lab in ex.labels)
            total, n, offset = total + loss.item() * k, n + k, offset + len(ex.input_ids)
        packed_loss = model(**forward_inputs({k: v[:1] for k, v in packed.items()}, True)).loss.item()
    assert math.isclose(packed_loss, total / n, rel_tol=1e-5)


# ---------------------------------------------------------------------------------------
# Training runs
# ---------------------------------------------------------------------------------------


def read_tsv(path: Path) -> list[tuple[int, float]]:
    lines = path.read_text().splitlines()[1:]
    return [(int(a), float(b)) for a, b in (line.split("\t") for line in lines)]


@pytest.mark.slow
def test_qlora_on_the_real_student_writes_every_output(tmp_path, monkeypatch):
    """SmolLM2-135M from its GGUF, NF4 + double quant, packing, completion-only, held-out eval."""
    monkeypatch.chdir(tmp_path)
    # 160 tokens: this instruct student trains in its chat template (the request evaluate sends it).
    params, _ = ft_project(tmp_path, None, student=SMOL, max_steps=2, save_steps=2, eval_steps=1,
                           batch_size=2, max_length=160, learning_rate=5e-4)
    m = run(params)
    out = tmp_path / "out"
    assert m["quantization"] == "nf4" and m["steps"] == 2 and m["device"] == "cpu"
    assert math.isfinite(m["train_loss"]) and math.isfinite(m["eval_loss"])
    assert m["tokens_per_s"] > 0 and m["peak_memory_mb"] > 100 and m["trainable_params"] > 0
    assert m["examples"]["train"] + m["examples"]["eval"] == 24 and m["examples"]["eval"] >= 1
    assert json.loads((out / "metrics.json").read_text()) == m
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert set(cfg["target_modules"]) >= {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                          "down_proj"}
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "adapter.gguf").stat().st_size > 0 and (out / "resolved_config.yaml").is_file()
    plots = out / "dvclive" / "plots" / "metrics"
    for name in ("train/loss", "train/learning_rate", "train/grad_norm", "train/tokens_per_s"):
        assert [s for s, _ in read_tsv(plots / f"{name}.tsv")] == [1, 2], name
    assert [s for s, _ in read_tsv(plots / "eval" / "loss.tsv")] == [1, 2]  # the last one is reused


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_adapter(tmp_path, monkeypatch, tiny_dir):
    """Crash after the step-4 checkpoint (mid-interval, after step 5 was logged), resume: the
    adapter and the logged losses equal an uninterrupted run's."""
    from safetensors.torch import load_file
    from transformers import TrainerCallback

    class Crash(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.global_step == 5 and "loss" in (logs or {}):
                raise KeyboardInterrupt("simulated kill")

    monkeypatch.chdir(tmp_path)
    ref_params, _ = ft_project(tmp_path / "ref", tiny_dir, max_steps=6, save_steps=2)
    ref = run(ref_params)
    params, _ = ft_project(tmp_path / "crash", tiny_dir, max_steps=6, save_steps=2)
    with pytest.raises(KeyboardInterrupt):
        run(params, callbacks=[Crash()])
    shutil.rmtree(tmp_path / "crash" / "out" / "dvclive")  # `dvc repro` deletes it before the stage runs
    resumed = run(params)
    assert resumed["resumed_from_step"] == 4 and resumed["steps"] == ref["steps"] == 6
    a = load_file(tmp_path / "ref" / "out" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "crash" / "out" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    loss = "dvclive/plots/metrics/train/loss.tsv"
    ref_loss = read_tsv(tmp_path / "ref" / "out" / loss)
    got_loss = read_tsv(tmp_path / "crash" / "out" / loss)
    assert [s for s, _ in got_loss] == [1, 2, 3, 4, 5, 6]
    assert [s for s, _ in got_loss] == [s for s, _ in ref_loss]
    assert all(math.isclose(x, y, rel_tol=1e-5) for (_, x), (_, y) in zip(ref_loss, got_loss, strict=True))
    assert math.isclose(resumed["eval_loss"], ref["eval_loss"], rel_tol=1e-5)
    # A rerun of a finished run trains nothing (no step past max_steps) and rewrites the same adapter.
    shutil.rmtree(tmp_path / "crash" / "out" / "dvclive")
    again = run(params)
    assert (again["resumed_from_step"], again["steps"], again["eval_loss"]) == (6, 6, resumed["eval_loss"])
    # ... and its curves and throughput come back from the checkpoint, not from the deleted folder.
    assert read_tsv(tmp_path / "crash" / "out" / loss) == got_loss
    assert again["tokens_per_s"] == resumed["tokens_per_s"] > 0
    rates = read_tsv(tmp_path / "crash" / "out" / "dvclive/plots/metrics/train/tokens_per_s.tsv")
    assert [s for s, _ in rates] == [1, 2, 3, 4, 5, 6]
    c = load_file(tmp_path / "crash" / "out" / "adapter" / "adapter_model.safetensors")
    assert all(torch.equal(b[key], c[key]) for key in b)
    # The final evaluation's curve too, and an adapter config that is the same bytes every time.
    eval_curve = "dvclive/plots/metrics/eval/loss.tsv"
    got_eval, ref_eval = (read_tsv(tmp_path / d / "out" / eval_curve) for d in ("crash", "ref"))
    assert [s for s, _ in got_eval] == [s for s, _ in ref_eval] == [6]
    assert math.isclose(got_eval[0][1], ref_eval[0][1], rel_tol=1e-5)
    configs = [(tmp_path / run_dir / "out" / "adapter" / "adapter_config.json").read_bytes() for run_dir in ("ref", "crash")]
    assert configs[0] == configs[1]
    targets = json.loads(configs[0])["target_modules"]
    assert targets == sorted(targets)


def test_partial_checkpoints_and_those_of_another_config_are_not_resumed(tmp_path):
    ckpt = tmp_path / "checkpoints"
    assert resume_point(ckpt, "fp-1") is None
    for step in (2, 10):
        (ckpt / f"checkpoint-{step}").mkdir()
        (ckpt / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    (ckpt / "checkpoint-12").mkdir()  # killed while saving: no trainer_state.json yet
    assert resume_point(ckpt, "fp-1") == ckpt / "checkpoint-10" and not (ckpt / "checkpoint-12").exists()
    assert resume_point(ckpt, "fp-2") is None and not (ckpt / "checkpoint-10").exists()


@pytest.mark.slow
def test_plain_lora_and_merge_into_bf16_base(tmp_path, monkeypatch, tiny_dir, tok):
    """quantization=none trains LoRA on the unquantized base; the merged bf16 model computes
    what base + adapter computes."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    monkeypatch.chdir(tmp_path)
    params, _ = ft_project(tmp_path, tiny_dir, quantization="none", compute_dtype="float32", max_steps=3,
                           learning_rate=5e-2, merge=True, packing=False, export_gguf=False)
    m = run(params)
    assert m["compute_dtype"] == "float32" and not (tmp_path / "out" / "adapter.gguf").exists()
    merged = AutoModelForCausalLM.from_pretrained(m["merged_dir"])
    assert merged.dtype == torch.bfloat16
    ids = torch.tensor([tok("def add(a, b):\n    return a + b").input_ids])
    base = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        plain = base(ids).logits
        want = PeftModel.from_pretrained(base, tmp_path / "out" / "adapter").eval()(ids).logits
        got = merged.float()(ids).logits
    scale = want.abs().max()
    assert (want - plain).abs().max() > 0.05 * scale  # the adapter matters...
    assert (got - want).abs().max() < 0.02 * scale  # ...and the merged model has it (bf16 rounding aside)


# ---------------------------------------------------------------------------------------
# Bad input fails before training
# ---------------------------------------------------------------------------------------


def test_bad_input_fails_before_training(tmp_path, monkeypatch, tiny_dir):
    monkeypatch.chdir(tmp_path)
    params, _ = ft_project(tmp_path, tiny_dir, rows=[])
    with pytest.raises(ConfigError, match="holds no records"):
        run(params)
    params, _ = ft_project(tmp_path, tiny_dir)
    with pytest.raises(ConfigError, match=r"finetune.target_modules: \['qkv_proj'\] match no linear layer"):
        run(params, "finetune.target_modules=[q_proj, qkv_proj]")
    with pytest.raises(ConfigError, match="no training example left"):
        run(params, "finetune.max_length=16", "finetune.drop_long=true")
    with pytest.raises(ConfigError, match="unknown model preset 'nope'"):
        load_config(params, ["finetune.student=nope"])
    bad = exercise(1)
    bad["prompt"] = "def something_else():"
    params, _ = ft_project(tmp_path, tiny_dir, rows=[bad, exercise(2)])
    with pytest.raises(ConfigError, match="does not start with its prompt"):
        run(params)
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_nf4_where_bitsandbytes_cannot_run_suggests_plain_lora(tmp_path, monkeypatch, tiny_dir):
    import bitsandbytes as bnb

    def broken(*args, **kwargs):
        raise RuntimeError("no 4-bit kernel for this device")

    monkeypatch.setattr(bnb.nn, "Linear4bit", broken)
    monkeypatch.chdir(tmp_path)
    params, _ = ft_project(tmp_path, tiny_dir)
    with pytest.raises(ConfigError, match="cannot run 4-bit.*finetune.quantization=none"):
        run(params)


def test_nan_or_spiking_loss_stops_with_a_clear_message(tmp_path):
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from pipeline.engines.training import make_callbacks

    def guard():
        return make_callbacks(ftcfg(loss_spike_factor=3.0), tmp_path)[0]

    args, control = TrainingArguments(output_dir=str(tmp_path), report_to="none"), TrainerControl()
    state = TrainerState()
    g = guard()
    for step, loss in enumerate([4.0, 2.0, 5.9], 1):
        state.global_step = step
        g.on_log(args, state, control, logs={"loss": loss})
    state.global_step = 4
    with pytest.raises(TrainingDiverged, match="loss 6.1 at step 4 exceeds finetune.loss_spike_factor=3.0"):
        g.on_log(args, state, control, logs={"loss": 6.1})
    with pytest.raises(TrainingDiverged, match="loss is nan at step 4"):
        guard().on_log(args, state, control, logs={"loss": float("nan")})
    state.log_history = [{"loss": 1.0}]  # a resumed run remembers the minimum it had reached
    g = guard()
    g.on_train_begin(args, state, control)
    with pytest.raises(TrainingDiverged):
        g.on_log(args, state, control, logs={"loss": 3.5})


# ---------------------------------------------------------------------------------------
# One format: a student trains on exactly the tokens the evaluator sends it
# ---------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("student", ["gemma-3-270m", SMOL])  # a base (completions) and an instruct (chat) preset
def test_training_format_is_the_evaluation_format(student):
    from pipeline.core.config import EvaluateConfig
    from pipeline.core.humaneval import load_problems
    from pipeline.engines.student import encode_context
    from pipeline.stages.evaluate import Bench, Convention, Target, build_requests, completion_from_chat

    preset = load_preset(student, REPO / "configs")
    tok = load_tokenizer(model_source(preset))
    problem = load_problems(3)[2]  # HumanEval/2: its prompt ends in a docstring and a newline
    # What the evaluator sends this student for that problem, tokenized as its engine does.
    bench = Bench("humaneval", [problem], 164, Convention("evalplus", "humaneval"))
    request = build_requests(Target("base", preset, preset.engine), bench, EvaluateConfig(), 0)[0]
    assert (request.messages is not None) == (preset.api == "chat")
    sent = encode_context(tok, prompt=request.prompt, messages=request.messages)
    # The same problem as a curated exercise: records hold the prompt without blank lines around it
    # (EvalPlus strips HumanEval's too).
    prompt = problem["prompt"].strip()
    rec = {"id": "he-2", "kind": "exercise", "prompt": prompt, "text": prompt + "\n" + problem["canonical_solution"]}
    ex = tokenize_record(rec, tok, completion_only=True, chat=preset.api == "chat")
    n = len(sent)
    assert ex.input_ids[:n] == sent  # the context is token for token the evaluator's request
    assert all(label == IGNORE for label in ex.labels[:n]) and all(label != IGNORE for label in ex.labels[n:])
    learned = tok.decode(ex.input_ids[n:], skip_special_tokens=True)
    if preset.api == "chat":  # the answer, read back by the evaluator's own parser, is the whole function
        completion = completion_from_chat(learned, problem)
        assert f"def {problem['entry_point']}(" in completion and problem["canonical_solution"].strip() in completion
        assert ex.input_ids[-1] != tok.eos_token_id or tok.eos_token in tok.apply_chat_template(
            [{"role": "assistant", "content": "x"}], tokenize=False)  # ends with the template's end of turn
    else:
        assert learned == problem["canonical_solution"] and ex.input_ids[-1] == tok.eos_token_id


def test_the_packing_probe_tells_packed_from_leaking_attention():
    from pipeline.engines.student import check_packed_attention, packed_logits_agree

    assert packed_logits_agree()  # the pinned torch/transformers keep packed examples apart
    # A full 2D mask is what a broken pair amounts to: the second example attends to the first.
    assert not packed_logits_agree(attention_mask=torch.ones(1, 12, dtype=torch.long))
    check_packed_attention()  # so finetune starts


def test_gpu_check_smoke_runs_the_project_code_path():
    """bench/gpu_check.py is run on a GPU machine with minutes to spare: its code path must work before."""
    import json
    import subprocess
    import sys

    out = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--smoke"], capture_output=True,
                         text=True, timeout=600, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    for mode in ("nf4", "bf16"):
        assert report[mode]["finite"] and report[mode]["tokens_per_s"] > 0, report[mode]
        assert report[mode]["trainable_params"] == report["bf16"]["trainable_params"]  # the same LoRA on both
    assert report["generation"]["tokens_per_s"] > 0 and report["qlora_over_lora_tokens_per_s"] > 0


def test_max_records_samples_are_seeded_nested_and_sorted():
    from pipeline.stages.finetune import sample_records

    recs = [{"id": f"ex-{i:06d}"} for i in range(50)]
    small, large = sample_records(recs, 12, 7), sample_records(recs, 24, 7)
    assert len(small) == 12 and len(large) == 24 and {r["id"] for r in small} <= {r["id"] for r in large}
    assert [r["id"] for r in small] == sorted(r["id"] for r in small) and sample_records(recs, 12, 7) == small
    assert sample_records(recs, 12, 8) != small and sample_records(recs, 0, 7) == recs == sample_records(recs, 99, 7)
