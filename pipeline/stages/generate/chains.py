"""The generate stage's chains: a prompt's first answer, then its repair rounds (an exercise whose
own asserts fail is sent back with the failures, `generate.repair_rounds`), each rebuilt from the
request cache by a cache-only `send` (a request not cached yet is raised, for the next wave).

    textbook generate --set generate.repair_rounds=1
"""

from __future__ import annotations

import asyncio
import dataclasses
from dataclasses import dataclass, field

import jinja2

from pipeline.core.schema import ParseError, exercise_program, parse_exercise
from pipeline.engines.llm import BudgetExhausted, LLMRequest, LLMResult
from pipeline.sandbox import Sandbox
from pipeline.sandbox.asserts import run_asserts
from pipeline.stages.generate.prompts import record_seed, render


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


def _fresh_lock(repairer: Repairer | None) -> Repairer | None:
    """The repairer with a lock of the event loop about to run (an asyncio.Lock belongs to one loop)."""
    return None if repairer is None else dataclasses.replace(repairer, lock=asyncio.Lock())
