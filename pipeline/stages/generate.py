"""Generate stage: textbook sections and exercises from a teacher LLM, phi-1 style.

Prompts are sampled combinatorially (seeded) over topic x subtopic pairs, audiences,
difficulty and a constraint on the function name, rendered from Jinja2 templates in
`prompts/`, and sent through the one LLM client (cache, retries, rate limits, budget).
Responses that do not parse, or that end for any reason but `stop`, go to
`rejected.jsonl` with their reason. A request that fails for a transport reason after its
retries is never a rejection: the stage caches every answer it got, writes nothing and exits
non-zero with one line (a re-run sends only the failed requests), unless
`generate.client.max_failed_fraction` accepts the loss (then counted in stats.json as `lost`).

Requests go out in waves, each through `LLMSession.complete` (online, or the Batch API with
`client.batch`): every prompt's first request, then each repair round's requests; between waves
the prompts' chains are rebuilt from the request cache alone, so the records never depend on
how or in which order the answers arrived.

Outputs (in `generate.output_dir`): exercises.jsonl, textbooks.jsonl, rejected.jsonl,
stats.json (DVC metrics), coverage.json, resolved_config.yaml.

    textbook generate --set generate.n_exercises=8 --set generate.n_textbooks=2
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import jinja2
import yaml

from pipeline.core.config import ConfigError, GenerateConfig, ModelPreset, RunConfig, configs_dir, load_preset
from pipeline.core.records import dumps, sha256_text, write_json, write_jsonl
from pipeline.core.schema import (
    ParseError,
    exercise_program,
    parse_exercise,
    parse_textbook,
    parse_truncated_exercise,
)
from pipeline.core.stage import write_resolved_config
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
from pipeline.sandbox.asserts import run_asserts

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------
# The prompt space and its seeded sampling
# ---------------------------------------------------------------------------------------


@dataclass
class PromptSpace:
    topics: dict[str, list[str]]
    audiences: list[str]
    difficulties: list[str]
    name_constraints: list[str]
    letters: list[str]

    @property
    def pairs(self) -> list[tuple[str, str]]:
        return [(t, s) for t, subs in self.topics.items() for s in subs]

    def size(self) -> int:
        """Distinct exercise prompts the space can produce."""
        return (len(self.pairs) * (len(self.topics) - 1) * len(self.audiences) * len(self.difficulties)
                * len(self.name_constraints) * len(self.letters))


def _nonempty_list(data: dict, key: str, path: Path) -> list:
    value = data.get(key)
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v.strip() for v in value):
        raise ConfigError(f"{path}: '{key}' must be a non-empty list of strings")
    return value


def load_prompt_space(prompts_dir: Path, topics_file: str = "topics.yaml") -> PromptSpace:
    def read(name: str, key: str = "generate.prompts_dir") -> tuple[dict, Path]:
        path = prompts_dir / name
        if not path.is_file():
            raise ConfigError(f"{key}: missing {path}")
        return yaml.safe_load(path.read_text(encoding="utf-8")) or {}, path

    topics_data, tpath = read(topics_file, "generate.topics_file")
    topics = topics_data.get("topics")
    if not isinstance(topics, dict) or not topics:
        raise ConfigError(f"{tpath}: 'topics' must be a non-empty mapping of topic -> subtopics")
    for topic, subs in topics.items():
        if not isinstance(subs, list) or not subs:
            raise ConfigError(f"{tpath}: topic '{topic}' has no subtopics")
    if len(topics) < 2:
        raise ConfigError(f"{tpath}: need at least two topics to form topic pairs")
    aud, apath = read("audiences.yaml")
    names, npath = read("names.yaml")
    return PromptSpace(
        topics={str(k): [str(s) for s in v] for k, v in topics.items()},
        audiences=_nonempty_list(aud, "audiences", apath),
        difficulties=_nonempty_list(aud, "difficulties", apath),
        name_constraints=_nonempty_list(names, "name_constraints", npath),
        letters=_nonempty_list(names, "letters", npath),
    )


def sample_specs(space: PromptSpace, n_exercises: int, n_textbooks: int, seed: int) -> list[dict]:
    """Seeded sampling of prompt attributes; a combination already drawn is redrawn (bounded)."""
    rng = random.Random(seed)
    pairs = space.pairs
    specs, seen = [], set()
    for kind, count, prefix in (("exercise", n_exercises, "ex"), ("textbook", n_textbooks, "tb")):
        for i in range(count):
            for _ in range(20):
                topic, subtopic = rng.choice(pairs)
                attrs = {"topic": topic, "subtopic": subtopic, "audience": rng.choice(space.audiences)}
                if kind == "exercise":
                    attrs["second_topic"] = rng.choice([t for t in space.topics if t != topic])
                    attrs["difficulty"] = rng.choice(space.difficulties)
                    attrs["name_constraint"] = rng.choice(space.name_constraints).format(letter=rng.choice(space.letters))
                combo = (kind, dumps(attrs))
                if combo not in seen:
                    break
            seen.add(combo)
            specs.append({"id": f"{prefix}-{i:06d}", "kind": kind, "attributes": attrs})
    return specs


def template_env(prompts_dir: Path) -> jinja2.Environment:
    # StrictUndefined: a template naming a variable we do not provide fails loudly, not as "".
    return jinja2.Environment(loader=jinja2.FileSystemLoader(str(prompts_dir)), undefined=jinja2.StrictUndefined,
                              keep_trailing_newline=False)


def render(env: jinja2.Environment, name: str, variables: dict) -> str:
    try:
        return env.get_template(name).render(**variables).strip()
    except jinja2.TemplateNotFound:
        raise ConfigError(f"template not found: {Path(env.loader.searchpath[0]) / name}") from None
    except jinja2.UndefinedError as exc:
        raise ConfigError(f"template {name}: {exc.message} (available variables: {sorted(variables)})") from None
    except jinja2.TemplateSyntaxError as exc:
        raise ConfigError(f"template {name}, line {exc.lineno}: {exc.message}") from None


def record_seed(run_seed: int, record_id: str) -> int:
    return int(sha256_text(f"{run_seed}:{record_id}")[:8], 16) % (2**31)


def build_requests(specs: list[dict], gen: GenerateConfig, preset: ModelPreset, run_seed: int,
                   prompts_dir: Path) -> list[LLMRequest]:
    env = template_env(prompts_dir)
    system = render(env, gen.system_prompt, {})
    s = gen.sampling
    out = []
    for spec in specs:
        template = gen.exercise_template if spec["kind"] == "exercise" else gen.textbook_template
        user = render(env, template, spec["attributes"])
        cap = gen.textbook_max_tokens if spec["kind"] == "textbook" and gen.textbook_max_tokens else s.max_tokens
        params = {"temperature": s.temperature, "top_p": s.top_p, "max_tokens": cap,
                  "stop": list(s.stop), "n": s.n, "seed": record_seed(run_seed, spec["id"]) if s.seed else None}
        if preset.api == "chat":
            out.append(LLMRequest(spec["id"], messages=[{"role": "system", "content": system},
                                                        {"role": "user", "content": user}], params=params))
        else:
            out.append(LLMRequest(spec["id"], prompt=f"{system}\n\n{user}\n\n", params=params))
    return out


# ---------------------------------------------------------------------------------------
# Parsing the teacher's answers
# ---------------------------------------------------------------------------------------


# Parsing lives in pipeline.core.schema (ParseError, parse_exercise, parse_textbook): the one schema.


# ---------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------
# Chains: a prompt's first answer, then its repair rounds
# ---------------------------------------------------------------------------------------


class _NotCached(Exception):
    """Raised by a cache-only pass for a request that must be sent (args[0]: the request)."""


class _Lost(Exception):
    """Raised by a cache-only pass for a request that failed for a transport reason in this run."""


@dataclass
class Chain:
    """One prompt's requests: ``request`` is the first, then a repair per round; ``paid`` holds every
    answer; ``final`` is the one the records come from (the best one: fewest failing asserts)."""

    request: LLMRequest
    final: LLMResult
    repairs: list[dict]
    paid: list[LLMResult]

    def usage(self) -> dict:
        ok = [r.usage for r in self.paid if r.ok]
        return {"prompt_tokens": sum(u["prompt_tokens"] for u in ok),
                "completion_tokens": sum(u["completion_tokens"] for u in ok)}


@dataclass
class Repairer:
    """What a repair round needs: the template, the sandbox and the run's seed."""

    env: jinja2.Environment
    template: str
    sandbox: Sandbox
    rounds: int
    run_seed: int
    lock: asyncio.Lock
    seen: dict = field(default_factory=dict)  # answer text -> failures: each pass over the cache runs an answer once

    async def failures(self, text: str) -> list[str] | None:
        """The failing asserts of an answer ([] = all pass); None if it does not parse (nothing to repair)."""
        if text in self.seen:
            return self.seen[text]
        try:
            parsed = parse_exercise(text)
        except ParseError:
            self.seen[text] = None
            return None
        async with self.lock:  # one sandbox batch at a time; each is a few milliseconds
            run = (await asyncio.to_thread(run_asserts, self.sandbox, [(exercise_program(parsed), parsed["tests"])]))[0]
        self.seen[text] = [] if run.all_passed else run.failures()
        return self.seen[text]

    def request(self, prev: LLMRequest, answer: str, failures: list[str], round_: int, spec_id: str) -> LLMRequest:
        rid = f"{spec_id}.repair{round_}"
        feedback = render(self.env, self.template, {"failures": failures})
        messages = [*prev.messages, {"role": "assistant", "content": answer}, {"role": "user", "content": feedback}]
        seed = record_seed(self.run_seed, rid) if prev.params.get("seed") is not None else None
        return LLMRequest(rid, messages=messages, params={**prev.params, "seed": seed})


async def _chain(spec: dict, req: LLMRequest, send, repairer: Repairer | None) -> Chain:
    first = await send(req)
    chain = Chain(req, first, [], [first])
    if repairer is None or spec["kind"] != "exercise" or req.messages is None:
        return chain
    current_req, current = req, first
    if not current.ok or current.choices[0]["finish_reason"] != "stop":
        return chain
    failures = await repairer.failures(current.choices[0]["text"])
    for round_ in range(1, repairer.rounds + 1):
        if not failures:  # None (does not parse) or [] (passes): nothing to repair
            break
        repair_req = repairer.request(current_req, current.choices[0]["text"], failures, round_, spec["id"])
        try:
            answer = await send(repair_req)
        except BudgetExhausted:
            chain.repairs.append({"round": round_, "failures": failures, "outcome": "stopped_by_budget"})
            break
        chain.paid.append(answer)
        entry = {"round": round_, "failures": failures}
        if not answer.ok or answer.choices[0]["finish_reason"] != "stop":
            chain.repairs.append({**entry, "outcome": "no_answer" if not answer.ok else "cut"})
            break
        after = await repairer.failures(answer.choices[0]["text"])
        # Keep the repair only if it is better: it parses and fails fewer asserts.
        if after is None or len(after) >= len(failures):
            chain.repairs.append({**entry, "outcome": "not_better", "raw": answer.choices[0]["text"]})
            break
        chain.repairs.append({**entry, "outcome": "accepted", "raw_before": current.choices[0]["text"]})
        current_req, current, failures = repair_req, answer, after
    chain.final = current
    return chain


async def _run_chains(jobs: list[tuple[dict, LLMRequest]], send, repairer: Repairer | None
                      ) -> tuple[dict[str, Chain], dict[str, LLMRequest], set[str], set[str]]:
    """Every prompt's chain from ``send`` (a cache-only lookup): (the finished chains by prompt id, the request each
    unfinished prompt waits for, the prompts lost to a failed request, the prompts not attempted for the budget)."""
    chains: dict[str, Chain] = {}
    waiting: dict[str, LLMRequest] = {}
    lost: set[str] = set()
    skipped: set[str] = set()
    for spec, req in jobs:
        try:
            chains[req.id] = await _chain(spec, req, send, repairer)
        except _NotCached as exc:
            waiting[req.id] = exc.args[0]  # by prompt: its first request or its next repair
        except _Lost:
            lost.add(req.id)
        except BudgetExhausted:
            skipped.add(req.id)
    return chains, waiting, lost, skipped


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
    write_json(out_dir / "stats.json", stats)
    if budget_hit:
        log.warning("budget of $%s reached: %d request(s) not sent; partial results kept",
                    gen.client.budget_usd, stats["not_attempted"])
    if lost:
        log.warning("%s; accepted by generate.client.max_failed_fraction=%s: %d prompt(s) lost",
                    session.failure_line(), gen.client.max_failed_fraction, len(lost))
    return stats


def _fresh_lock(repairer: Repairer | None) -> Repairer | None:
    """The repairer with a lock of the event loop about to run (an asyncio.Lock belongs to one loop)."""
    return None if repairer is None else dataclasses.replace(repairer, lock=asyncio.Lock())


def main(args) -> int:
    from pipeline.core.stage import load_stage_config

    cfg, path = load_stage_config(args)
    try:
        stats = run_generate(cfg, path, progress=not args.quiet)
    except LLMError as exc:  # transport failures past max_failed_fraction, or an answer no retry can fix
        print(f"textbook generate: error: {exc}", file=sys.stderr)
        return 1
    print(dumps({"kept": stats["kept"], "rejected": stats["rejected"], "not_attempted": stats["not_attempted"],
                 **({"lost": stats["lost"]} if stats["lost"] else {})}))
    return 0
