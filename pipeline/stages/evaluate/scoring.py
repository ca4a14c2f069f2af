"""Execution and scoring for the evaluate stage: the self-check of the canonical solutions, every
sample's program run before its problem's tests, pass@k with its intervals, the deltas between
models and the sanity flags.

    python -c "from pipeline.stages.evaluate.scoring import score; print(score([], ['a'], [1]))"
"""

from __future__ import annotations

import re
import time
from typing import Any

from pipeline.core.config import EvaluateConfig
from pipeline.core.passk import (
    bootstrap_interval,
    estimate_pass_at_k,
    mean_pass_at_k,
    paired_delta,
    wilson_interval,
)
from pipeline.engines.llm import LLMRequest, LLMResult
from pipeline.sandbox import Job, Sandbox, Verdict
from pipeline.stages.evaluate.benchmarks import INFO
from pipeline.stages.evaluate.generation import GenerationStats
from pipeline.stages.evaluate.harness import EVALPLUS_CHAT_STOP, Convention, truncate_at_stop
from pipeline.stages.evaluate.targets import Bench, Target

SANITY_MIN_PROBLEMS = 10  # below this, a pass@1 of 0 or 1 is unremarkable


def verdict_error(v: Verdict) -> str | None:
    if v.passed:
        return None
    parts = [f"{v.error_type or v.status}: {v.error_message or ''}".strip()]
    if v.failed_source:
        parts.append(f"at `{v.failed_source.strip()}`")
    return " ".join(parts)[:500]


def self_check(problems: list[dict], sandbox: Sandbox, conv: Convention) -> tuple[float, list[str], dict[str, float]]:
    """Run the canonical solutions through the evaluation's own path: (pass rate, failing task ids, each
    reference's wall time: the base of the harness's time limit)."""
    jobs = [Job(conv.reference_program(p), test=p["test"], entry_point=p["entry_point"], check=p.get("check_call"),
                job_id=f"canonical:{p['task_id']}", **conv.limits(0.0)) for p in problems]
    verdicts = sandbox.run(jobs)
    failing = [f"{p['task_id']} ({v.status})" for p, v in zip(problems, verdicts, strict=True) if not v.passed]
    times = {p["task_id"]: v.wall_s for p, v in zip(problems, verdicts, strict=True)}
    return 1 - len(failing) / max(1, len(problems)), failing, times


def completions_for(target: Target, bench: Bench, requests: list[LLMRequest], results: dict[str, LLMResult],
                    ev: EvaluateConfig) -> list[dict]:
    """Post-processed samples, in task then sample order: the completion (a base model's cut at the stop
    sequences, a chat model's answer) and the program the harness runs before the tests."""
    chat = target.preset.api == "chat"
    stop, problems = bench.conv.stop(ev.stop), bench.by_id
    rows = []
    for r in requests:
        res = results[r.id]
        task_id, i = r.id.split("|")[-1].rsplit("#", 1)
        raw = res.choices[0]["text"]
        if chat and ev.chat_prefill:  # code continuing the begun block: cut at its end
            begun = r.messages[-1]["content"]
            # llama-server returns the begun text with its continuation, vLLM the continuation alone.
            completion = truncate_at_stop(raw.removeprefix(begun), EVALPLUS_CHAT_STOP)
        else:
            completion = raw if chat else truncate_at_stop(raw, stop)
        rows.append({"benchmark": bench.name, "task_id": task_id, "sample": int(i), "completion": completion,
                     "program": bench.conv.program(problems[task_id], completion, chat),
                     "finish_reason": res.choices[0].get("finish_reason")})
    return rows


def execute(bench: Bench, targets: list[Target], samples: dict[str, list[dict]], ev: EvaluateConfig,
            sandbox: Sandbox, progress: bool) -> dict[str, float]:
    """Run every sample's program before its problem's tests; the verdicts go into the rows. Seconds per model."""
    by_id, seconds = bench.by_id, {}
    for t in targets:
        rows = samples[t.name]
        t0 = time.monotonic()
        jobs = [Job(r["program"], test=by_id[r["task_id"]]["test"], entry_point=by_id[r["task_id"]]["entry_point"],
                    check=by_id[r["task_id"]].get("check_call"), job_id=f"{t.name}:{bench.name}:{r['task_id']}#"
                    f"{r['sample']}", **bench.conv.limits(bench.reference_s[r["task_id"]])) for r in rows]
        verdicts = sandbox.run(jobs, progress=progress)
        seconds[t.name] = time.monotonic() - t0
        for row, v in zip(rows, verdicts, strict=True):
            row.update(passed=v.passed, status=v.status, error=verdict_error(v), subset=bench.subset)
    return seconds


def score(rows: list[dict], problem_ids: list[str], ks: list[int]) -> tuple[dict[str, dict], dict]:
    """(per-problem {n, c, pass@1}, pass@k for each k)."""
    per: dict[str, dict] = {tid: {"n": 0, "c": 0} for tid in problem_ids}
    for row in rows:
        per[row["task_id"]]["n"] += 1
        per[row["task_id"]]["c"] += int(row["passed"])
    for v in per.values():
        v["pass@1"] = v["c"] / v["n"] if v["n"] else 0.0
    counts = [(v["n"], v["c"]) for v in per.values()]
    return per, {f"pass@{k}": mean_pass_at_k(counts, k) for k in sorted(set(ks) | {1})}


def sanity_flags(name: str, pass1: float, n_problems: int, rows: list[dict]) -> list[str]:
    flags = []
    if n_problems >= SANITY_MIN_PROBLEMS and pass1 in (0.0, 1.0):
        flags.append(f"{name}: pass@1 is exactly {pass1:.1f} on {n_problems} problems; check the completions "
                     f"(samples_{name}.jsonl) and the harness")
    empty = sum(not r["completion"].strip() for r in rows)
    if empty > len(rows) / 2:
        flags.append(f"{name}: {empty} of {len(rows)} completions are empty after post-processing")
    errors = sum(r["status"] == "error" for r in rows)
    if errors:
        flags.append(f"{name}: {errors} execution(s) ended in 'error' (the sandbox could not run them)")
    capped = sum(r["finish_reason"] == "length" for r in rows)
    if capped > len(rows) / 2:
        flags.append(f"{name}: {capped} of {len(rows)} completions hit max_tokens")
    return flags


def _r(x: float | None, nd: int = 6) -> float | None:
    return None if x is None else round(x, nd)


def model_metrics(rows: list[dict], ids: list[str], ev: EvaluateConfig, gen: GenerationStats,
                  execution_s: float) -> tuple[dict[str, dict], dict]:
    """(per-problem results, the model's metrics): pass@k, the Wilson interval of pass@1, rates, timings."""
    per, passk = score(rows, ids, ev.ks)
    # With several samples the unit is still the problem: the interval is over len(ids), not the samples.
    lo, hi = wilson_interval(passk["pass@1"] * len(ids), len(ids))
    intervals = {"pass@1_ci95_low": _r(lo), "pass@1_ci95_high": _r(hi)}
    if ev.n_samples > 1:  # per-problem estimates are fractions: a bootstrap over problems, for every k
        for key, value in passk.items():
            k = int(key.split("@")[1])
            if value is None:
                continue
            blo, bhi = bootstrap_interval([estimate_pass_at_k(v["n"], v["c"], k) for v in per.values()], seed=ev.seed)
            intervals.update({f"{key}_ci95_low": _r(blo), f"{key}_ci95_high": _r(bhi)})
        intervals["interval"] = "bootstrap over problems (2000 resamples)"
    return per, {**{k: _r(v) for k, v in passk.items()}, **intervals,
                 "passed_samples": sum(v["c"] for v in per.values()),
                 "problems_solved": sum(v["c"] > 0 for v in per.values()),
                 "empty_completions": sum(not r["completion"].strip() for r in rows),
                 "cut_at_max_tokens": sum(r["finish_reason"] == "length" for r in rows),
                 **gen.as_dict(gen.requests_sent / ev.n_samples), "execution_s": round(execution_s, 3)}


def delta_metrics(base: dict, fine: dict, base_per: dict[str, dict], fine_per: dict[str, dict]) -> dict:
    """finetuned - base for every pass@k, and whether the pass@1 delta is within noise (paired, same problems)."""
    d = paired_delta([base_per[i]["pass@1"] for i in base_per], [fine_per[i]["pass@1"] for i in base_per])
    return {**{k: _r(fine[k] - base[k]) for k in base
               if re.fullmatch(r"pass@\d+", k) and base[k] is not None and fine.get(k) is not None},
            "pass@1_ci95_low": _r(d["ci95_low"]), "pass@1_ci95_high": _r(d["ci95_high"]),
            "p_value": _r(d["p_value"]), "test": d["test"], "within_noise": d["within_noise"],
            "improved_problems": d["improved"], "regressed_problems": d["regressed"]}


def bench_metrics(bench: Bench, targets: list[Target], samples: dict[str, list[dict]], ev: EvaluateConfig,
                  gen_stats: dict[str, GenerationStats], exec_s: dict[str, float]
                  ) -> tuple[dict[str, Any], dict[str, dict[str, dict]], list[str]]:
    """(the benchmark's metrics, per-problem results per model, sanity flags)."""
    ids = [p["task_id"] for p in bench.problems]
    harness = f"{ev.harness} (local chat prefill)" if ev.chat_prefill else ev.harness
    out: dict[str, Any] = {"benchmark": INFO[bench.name].label, "harness": harness, "problems": len(ids),
                           "problems_total": bench.total, "subset": bench.subset,
                           "samples_per_problem": ev.n_samples, "temperature": ev.temperature, "top_p": ev.top_p,
                           "max_tokens": ev.max_tokens, **({"source": bench.source} if bench.source else {})}
    per_problem: dict[str, dict[str, dict]] = {}
    flags: list[str] = []
    for t in targets:
        rows = samples[t.name]
        per_problem[t.name], out[t.name] = model_metrics(rows, ids, ev, gen_stats[t.name], exec_s[t.name])
        flags += [f"{bench.name}: {f}" for f in sanity_flags(t.name, out[t.name]["pass@1"], len(ids), rows)]
    if "base" in per_problem and "finetuned" in per_problem:
        out["delta"] = delta_metrics(out["base"], out["finetuned"], per_problem["base"], per_problem["finetuned"])
    if "pretrained" in per_problem:  # each phase against the model before it, paired on the same problems
        steps = {"pretrain": ("base", "pretrained"), "finetune": ("pretrained", "finetuned")}
        out["phases"] = {step: delta_metrics(out[a], out[b], per_problem[a], per_problem[b])
                         for step, (a, b) in steps.items() if a in per_problem and b in per_problem}
    return out, per_problem, flags
