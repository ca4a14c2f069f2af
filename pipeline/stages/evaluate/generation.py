"""Generation for the evaluate stage: which servers start for which targets, and every target's
completions, from the request cache first; a server starts only for a target with uncached requests.
Targets on the transformers engine generate in this process (pipeline.engines.inprocess).

    textbook evaluate --set evaluate.problems=4
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from pipeline.core.config import ClientConfig, ModelPreset, RunConfig
from pipeline.engines.inprocess import generate_in_process
from pipeline.engines.llm import (
    LLMClient,
    LLMRequest,
    LLMResult,
    LLMSession,
    RequestCache,
    RequestsFailed,
    lookup,
    resolve_api_key,
)
from pipeline.engines.servers import serve
from pipeline.stages.evaluate.targets import EvaluationError, Target

# Kept across runs like the generate cache (see the report for the DVC note on this folder).
LOG_DIR = Path("logs")


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


def generate_all(targets: list[Target], requests: dict[str, list[LLMRequest]], client_cfg: ClientConfig,
                 cache: RequestCache, progress: bool) -> tuple[dict[str, dict[str, LLMResult]], dict[str, GenerationStats]]:
    """Results per target and request id; servers start only for targets with uncached requests."""
    results: dict[str, dict[str, LLMResult]] = {t.name: {} for t in targets}
    stats = {t.name: GenerationStats() for t in targets}
    for t in targets:
        if t.engine == "transformers":
            results[t.name], load_s, gen_s = generate_in_process(t.preset, t.identity, t.adapter, requests[t.name],
                                                                 cache, progress, t.name, client_cfg.concurrency)
            stats[t.name].server_start_s += load_s
            stats[t.name].generation_s += gen_s
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

