"""The one entry the stages call (`LLMSession`): a list of requests in, answers out, from the cache, a
server started only when needed or the Batch API, with the failure policy applied."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections import Counter
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

from tqdm import tqdm

from pipeline.core.config import ClientConfig, ConfigError, ModelPreset
from pipeline.engines.llm.budget import Ledger
from pipeline.engines.llm.cache import RequestCache, lookup
from pipeline.engines.llm.client import LLMClient
from pipeline.engines.llm.errors import BudgetExhausted, RequestsFailed
from pipeline.engines.llm.protocol import LLMRequest, LLMResult, request_key


@dataclass
class Outcome:
    """What one `LLMSession.complete` call got, by request id."""

    results: dict[str, LLMResult] = field(default_factory=dict)  # answered: from the cache or sent
    failed: dict[str, LLMResult] = field(default_factory=dict)  # transport failures (error in TRANSPORT)
    not_attempted: list[str] = field(default_factory=list)  # never sent: the budget was reached
    budget_hit: bool = False


class LLMSession:
    """How a stage completes its requests: the cached ones from the cache, the others from a server
    started only then (`serve`, kept for the session's later calls) or through the Batch API
    (client.batch); one ledger and one budget over every call; transport failures collected for
    `raise_if_failed`; an answer no retry can fix raised at once (EndpointRejected).

        with LLMSession(preset, cfg.client, cache, serve=lambda: serve(preset, Path("logs"))) as session:
            outcome = session.complete(requests)
        session.raise_if_failed(lost=len(outcome.failed), total=len(requests))
    """

    def __init__(self, preset: ModelPreset, cfg: ClientConfig, cache: RequestCache, *,
                 serve: Callable[[], AbstractContextManager[list[str]]] | None = None, urls: list[str] | None = None,
                 progress: bool = False, desc: str = "requests", seed: int = 0, cost_so_far: float = 0.0):
        if cfg.batch and not (preset.engine == "remote" and preset.batch_api and preset.base_url):
            raise ConfigError(f"client.batch: preset '{preset.name}' does not offer the Batch API (it needs engine "
                              f"'remote', one base_url and batch_api: true; this one is {preset.engine}"
                              f"{', batch_api: false' if preset.engine == 'remote' and not preset.batch_api else ''})")
        self.preset, self.cfg, self.cache = preset, cfg, cache
        self.progress, self.desc, self.seed = progress, desc, seed
        self.ledger = Ledger(cost_usd_total=cost_so_far)
        self.failed: dict[str, LLMResult] = {}  # by cache key, over every call; a later answer takes it out
        self.answered_sent = 0  # answers this LLMSession got from the endpoint (cached as they came)
        self.sent = False
        self.server_start_s = 0.0
        self._serve, self._urls = serve, urls
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> LLMSession:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self._stack.close()

    def endpoint(self) -> str:
        if self.cfg.batch:
            return f"preset '{self.preset.name}' (Batch API at {self.preset.base_url})"
        urls = self._urls or self.preset.base_urls or ([self.preset.base_url] if self.preset.base_url else [])
        return f"preset '{self.preset.name}'" + (f" at {', '.join(urls)}" if urls else "")

    def _endpoint_urls(self) -> list[str]:
        if self._urls is None:
            if self._serve is None:
                raise ValueError("LLMSession needs serve or urls to send requests")
            t0 = time.monotonic()
            self._urls = list(self._stack.enter_context(self._serve()))
            self.server_start_s += time.monotonic() - t0
        return self._urls

    def complete(self, requests: list[LLMRequest]) -> Outcome:
        """Every request's answer, in `results` (cached ones without sending anything), `failed` or `not_attempted`."""
        out = Outcome()
        pending = []
        for req in requests:
            hit = lookup(self.cache, self.preset, req)
            if hit is None:
                pending.append(req)
            else:
                out.results[req.id] = hit
                self.ledger.cache_hits += 1
                self.ledger.cost_usd_total += hit.cost_usd
        if pending:
            self.sent = True
            if self.cfg.batch:
                from pipeline.engines.batch import BatchRunner

                runner = BatchRunner(self.preset, self.cfg, self.cache, self.ledger, self.progress, self.desc)
                failed, not_attempted = asyncio.run(runner.run(pending))
                got = {}
                for req in pending:
                    key = request_key(self.preset.identity(), self.preset.api, req.messages, req.prompt, req.params)
                    hit = lookup(self.cache, self.preset, req)
                    if hit is not None:
                        got[req.id] = dataclasses.replace(hit, cached=False)
                    elif key in failed:
                        got[req.id] = dataclasses.replace(failed[key], id=req.id)
                    elif key not in not_attempted:  # cannot happen: every submitted key is answered or failed
                        got[req.id] = LLMResult(req.id, key, error="batch_missing", error_message="no answer")
                out.budget_hit = bool(not_attempted)
            else:
                got, out.budget_hit = asyncio.run(self._online(self._endpoint_urls(), pending))
            for req in pending:
                result = got.get(req.id)
                if result is None:
                    out.not_attempted.append(req.id)
                elif result.ok:
                    out.results[req.id] = result
                    self.answered_sent += 1
                else:
                    out.failed[req.id] = result
        for r in out.failed.values():
            self.failed[r.key] = r
        for r in out.results.values():
            self.failed.pop(r.key, None)
        return out

    async def _online(self, urls: list[str], pending: list[LLMRequest]) -> tuple[dict[str, LLMResult], bool]:
        results: dict[str, LLMResult] = {}
        budget_hit = False
        client = LLMClient(self.preset, urls, self.cfg, cache=self.cache, rng_seed=self.seed, ledger=self.ledger)
        queue = iter(pending)  # shared by the workers: requests go out in order
        with tqdm(total=len(pending), desc=self.desc, unit="req", disable=not self.progress, mininterval=0.5) as bar:
            t0 = time.monotonic()

            def on_result(_: LLMResult) -> None:
                dt, led = max(time.monotonic() - t0, 1e-9), self.ledger
                bar.update(1)
                bar.set_postfix(req_s=f"{led.requests_sent / dt:.1f}", tok_s=f"{led.completion_tokens / dt:.0f}",
                                cost=f"${led.cost_usd_total:.4f}", failed=led.failed, refresh=False)

            client.on_result = on_result

            async def worker() -> None:
                nonlocal budget_hit
                for req in queue:
                    if budget_hit:
                        return
                    try:
                        results[req.id] = await client.generate(req)
                    except BudgetExhausted:
                        budget_hit = True
                        return

            async with client:
                tasks = [asyncio.ensure_future(worker()) for _ in range(min(self.cfg.concurrency, len(pending)))]
                try:
                    await asyncio.gather(*tasks)
                except BaseException:  # EndpointRejected (or an interrupt): stop the others, then raise
                    for t in tasks:
                        t.cancel()
                    await asyncio.gather(*tasks, return_exceptions=True)
                    raise
        return results, budget_hit

    def ledger_dict(self) -> dict:
        """This run's ledger; {} when nothing was sent."""
        return self.ledger.as_dict() if self.sent else {}

    def failure_stats(self) -> dict:
        """For a stage's stats: the requests that failed for a transport reason, and why."""
        kinds = Counter(r.error for r in self.failed.values())
        return {"failed_requests": len(self.failed), "failed_by_error": dict(sorted(kinds.items()))}

    def failure_line(self) -> str:
        n = len(self.failed)
        kinds = ", ".join(f"{k}: {v}" for k, v in self.failure_stats()["failed_by_error"].items())
        return (f"{n} request(s) failed at {self.endpoint()} ({kinds}); {self.answered_sent} answered and cached; "
                f"run again: only the {n} failed requests are sent")

    def raise_if_failed(self, lost: int, total: int) -> None:
        """RequestsFailed unless the `lost` units (prompts, problems) of `total` are within client.max_failed_fraction."""
        if self.failed and lost > self.cfg.max_failed_fraction * total:
            raise RequestsFailed(self.failure_line())
