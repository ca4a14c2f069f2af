"""The generate stage's core (`run_generate`) and its CLI: the waves of requests, the records made of
every prompt's chain, the coverage of the prompt space and the stats.

    textbook generate --set generate.n_exercises=8 --set generate.n_textbooks=2
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from pathlib import Path

from pipeline.core.artifacts import GenerateStats
from pipeline.core.config import ModelPreset, RunConfig, configs_dir, load_preset
from pipeline.core.records import dumps, sha256_text, write_json, write_jsonl
from pipeline.core.schema import ParseError, parse_exercise, parse_textbook, parse_truncated_exercise
from pipeline.core.stage import stage_cli, write_resolved_config
from pipeline.engines.llm import (
    BudgetExhausted,
    LLMError,
    LLMRequest,
    LLMResult,
    LLMSession,
    RequestCache,
    lookup,
    request_key,
    resolve_api_key,
)
from pipeline.engines.servers import serve
from pipeline.sandbox import Sandbox
from pipeline.stages.generate.chains import Chain, Repairer, _fresh_lock, _Lost, _NotCached, _run_chains
from pipeline.stages.generate.prompts import (
    PromptSpace,
    build_requests,
    load_prompt_space,
    render,
    sample_specs,
    template_env,
)

log = logging.getLogger(__name__)


def to_records(spec: dict, chain: Chain, preset: ModelPreset, salvage: bool = False) -> tuple[list[dict], list[dict]]:
    """(kept, rejected) records for one prompt's chain; one record per choice of its final answer.
    ``salvage``: an exercise cut at max_tokens in its tests keeps what came before the cut."""
    req = chain.request
    base = {
        "kind": spec["kind"], "attributes": spec["attributes"],
        "prompt_hash": sha256_text(dumps(req.messages or req.prompt)),
        "model": preset.model, "model_identity": preset.identity(), "sampling": req.params,
    }
    if chain.repairs:
        base["repairs"] = chain.repairs
    # Every answer here came from the cache: a failed request never becomes a record (it stops the stage).
    kept, rejected = [], []
    choices = chain.final.choices
    for k, choice in enumerate(choices):
        rid = spec["id"] if len(choices) == 1 else f"{spec['id']}.{k}"
        rec = {**base, "id": rid, "raw": choice["text"], "finish_reason": choice["finish_reason"],
               "usage": chain.usage() if k == 0 else {"prompt_tokens": 0, "completion_tokens": 0}}
        if choice["finish_reason"] != "stop":
            if salvage and spec["kind"] == "exercise" and choice["finish_reason"] == "length":
                try:
                    kept.append({**rec, "parsed": parse_truncated_exercise(choice["text"]), "salvaged": "length"})
                    continue
                except ParseError as exc:
                    rec["detail"] = str(exc)
            rejected.append({**rec, "reason": f"finish_reason={choice['finish_reason']}"})
            continue
        try:
            parser = parse_exercise if spec["kind"] == "exercise" else parse_textbook
            kept.append({**rec, "parsed": parser(choice["text"])})
        except ParseError as exc:
            rejected.append({**rec, "reason": f"parse:{exc}"})
    return kept, rejected


def coverage(specs: list[dict], requests: list[LLMRequest], exercises: list[dict], space: PromptSpace) -> dict:
    hashes = Counter(sha256_text(dumps(r.messages or r.prompt)) for r in requests)
    attrs = [s["attributes"] for s in specs]
    names = [e["parsed"]["function_name"] for e in exercises]
    return {
        "prompts": len(requests),
        "duplicate_prompt_rate": round(1 - len(hashes) / max(1, len(requests)), 6),
        "distinct_topics": len({a["topic"] for a in attrs}),
        "distinct_topic_subtopic_pairs": len({(a["topic"], a["subtopic"]) for a in attrs}),
        "topic_subtopic_pairs_available": len(space.pairs),
        "distinct_topic_pairs": len({(a["topic"], a.get("second_topic")) for a in attrs if "second_topic" in a}),
        "distinct_audiences": len({a["audience"] for a in attrs}),
        "distinct_function_names": len(set(names)),
        "function_name_duplicate_rate": round(1 - len(set(names)) / max(1, len(names)), 6),
        "space": {"topics": len(space.topics), "topic_subtopic_pairs": len(space.pairs),
                  "audiences": len(space.audiences), "name_constraints": len(space.name_constraints),
                  "exercise_prompts_possible": space.size()},
    }


def run_generate(cfg: RunConfig, config_path: Path, progress: bool = True) -> dict:
    """The stage's core: returns its stats (also written to stats.json)."""
    gen = cfg.generate
    root = configs_dir(config_path)
    preset = load_preset(gen.teacher, root)
    prompts_dir = Path(gen.prompts_dir)
    if not prompts_dir.is_absolute():
        prompts_dir = config_path.resolve().parent / prompts_dir
    space = load_prompt_space(prompts_dir, gen.topics_file)
    specs = sample_specs(space, gen.n_exercises, gen.n_textbooks, cfg.seed)
    requests = build_requests(specs, gen, preset, cfg.seed, prompts_dir)
    if gen.repair_rounds:
        render(template_env(prompts_dir), gen.repair_template, {"failures": []})  # a bad template fails before any work
    resolve_api_key(preset)  # a missing key fails here, before any work
    out_dir = Path(gen.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_resolved_config(cfg, root, "generate", out_dir)

    by_id = {s["id"]: s for s in specs}
    jobs = [(by_id[r.id], r) for r in requests]
    cache = RequestCache(gen.cache_path)
    t0 = time.monotonic()
    budget_hit = False
    failed_keys: set[str] = set()
    identity = preset.identity()
    with contextlib.ExitStack() as stack:
        stack.callback(cache.close)
        session = stack.enter_context(LLMSession(
            preset, gen.client, cache, serve=lambda: serve(preset, Path("logs")), progress=progress, desc="generate",
            seed=cfg.seed))
        repairer = None
        if gen.repair_rounds and gen.n_exercises:
            sandbox = stack.enter_context(Sandbox(gen.sandbox))
            repairer = Repairer(template_env(prompts_dir), gen.repair_template, sandbox, gen.repair_rounds, cfg.seed,
                                asyncio.Lock())

        async def from_cache(req: LLMRequest) -> LLMResult:
            hit = lookup(cache, preset, req)
            if hit is not None:
                return hit
            if request_key(identity, preset.api, req.messages, req.prompt, req.params) in failed_keys:
                raise _Lost(req.id)
            if budget_hit:
                raise BudgetExhausted(f"budget of ${gen.client.budget_usd} reached")
            raise _NotCached(req)

        # Waves: rebuild every chain from the cache; send what they wait for (first answers, then each repair
        # round); again. A fully cached run starts no server and sends nothing.
        for wave in range(gen.repair_rounds + 3):
            chains, waiting, lost, skipped = asyncio.run(_run_chains(jobs, from_cache, _fresh_lock(repairer)))
            if wave == 0:  # the answers already cached: counted as hits, and their cost against the budget
                session.ledger.cache_hits = sum(len(c.paid) for c in chains.values())
                session.ledger.cost_usd_total = sum(r.cost_usd for c in chains.values() for r in c.paid)
            if not waiting:
                break
            outcome = session.complete(list(waiting.values()))
            failed_keys |= {r.key for r in outcome.failed.values()}
            budget_hit = budget_hit or outcome.budget_hit
        skipped |= set(waiting)  # (never: each wave answers, fails or skips every request it is given)
    elapsed = time.monotonic() - t0
    # Transport failures: nothing is written and the stage fails with one line, unless the loss is accepted.
    session.raise_if_failed(lost=len(lost), total=len(requests))

    exercises, textbooks, rejected = [], [], []
    for req in requests:
        if req.id not in chains:
            continue  # not attempted (budget): neither kept nor rejected; a re-run picks it up
        kept, rej = to_records(by_id[req.id], chains[req.id], preset, gen.salvage_truncated)
        (exercises if by_id[req.id]["kind"] == "exercise" else textbooks).extend(kept)
        rejected.extend(rej)
    write_jsonl(out_dir / "exercises.jsonl", exercises)
    write_jsonl(out_dir / "textbooks.jsonl", textbooks)
    write_jsonl(out_dir / "rejected.jsonl", rejected)
    cov = coverage(specs, requests, exercises, space)
    write_json(out_dir / "coverage.json", cov)

    paid = [r for c in chains.values() for r in c.paid]
    usage = [c.usage() for c in chains.values()]
    reasons = Counter(":".join(r["reason"].split(":")[:2]) for r in rejected)
    outcomes = Counter(e["outcome"] for c in chains.values() for e in c.repairs)
    stats = {
        "teacher": preset.name,
        "requested": len(requests),
        "completed": len(chains),
        "not_attempted": len(skipped),
        "stopped_by_budget": budget_hit,
        # Prompts lost to requests that failed for a transport reason, accepted by client.max_failed_fraction.
        "lost": len(lost),
        **session.failure_stats(),
        "kept": {"exercise": len(exercises), "textbook": len(textbooks)},
        "rejected": len(rejected),
        "rejected_by_reason": dict(sorted(reasons.items())),
        "salvaged_from_length": sum(1 for r in exercises if r.get("salvaged") == "length"),
        "repair": {"rounds": gen.repair_rounds, "requests": sum(outcomes.values()),
                   "by_outcome": dict(sorted(outcomes.items())),
                   "exercises_repaired": sum(1 for c in chains.values() if any(
                       e["outcome"] == "accepted" for e in c.repairs))},
        "tokens": {"prompt": sum(u["prompt_tokens"] for u in usage),
                   "completion": sum(u["completion_tokens"] for u in usage)},
        "cost_usd": round(sum(r.cost_usd for r in paid), 6),
        "ledger_this_run": session.ledger_dict(),
        "coverage": {k: v for k, v in cov.items() if k != "space"},
        "timing": {"wall_s": round(elapsed, 2), "server_start_s": round(session.server_start_s, 2)},
    }
    GenerateStats.parse(stats, out_dir / "stats.json").write(out_dir / "stats.json")
    if budget_hit:
        log.warning("budget of $%s reached: %d request(s) not sent; partial results kept",
                    gen.client.budget_usd, stats["not_attempted"])
    if lost:
        log.warning("%s; accepted by generate.client.max_failed_fraction=%s: %d prompt(s) lost",
                    session.failure_line(), gen.client.max_failed_fraction, len(lost))
    return stats


def main(args) -> int:
    # Transport failures past max_failed_fraction, or an answer no retry can fix: one line, exit status 1.
    return stage_cli(run_generate, args, lambda stats: {
        "kept": stats["kept"], "rejected": stats["rejected"], "not_attempted": stats["not_attempted"],
        **({"lost": stats["lost"]} if stats["lost"] else {})}, {LLMError: ("generate failed", 1)})
