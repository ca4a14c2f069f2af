"""The async client for one model's endpoints: bounded concurrency, the token buckets, retries with
backoff and failover between replicas (`Endpoints`), the budget reservation, the cache and the ledger
fed on every attempt."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable
from typing import Any

import httpx
import openai
from openai.types import Completion
from openai.types.chat import ChatCompletion

from pipeline.core.config import ClientConfig, ModelPreset
from pipeline.core.records import dumps
from pipeline.engines.llm.budget import Ledger, TokenBucket, worst_case_usd
from pipeline.engines.llm.cache import RequestCache, lookup
from pipeline.engines.llm.errors import (
    ENDPOINT_ERRORS,
    RETRYABLE,
    BudgetExhausted,
    EndpointRejected,
    _classify,
    _server_said,
    is_fatal,
    rejection,
    scrub,
)
from pipeline.engines.llm.protocol import (
    LLMRequest,
    LLMResult,
    length_retry,
    parse_answer,
    request_body,
    request_key,
    resolve_api_key,
)

log = logging.getLogger(__name__)


class Endpoints:
    """Which endpoint a request goes to: the live one with the fewest requests in flight. One that fails
    (ENDPOINT_ERRORS) is left out for `cooldown_s`, doubling while it keeps failing (up to 16x), then
    tried again; a success clears it. With every endpoint down, the one back soonest is tried."""

    def __init__(self, n: int, cooldown_s: float):
        self.cooldown_s = cooldown_s
        self.inflight = [0] * n
        self.down_until = [0.0] * n
        self.failures = [0] * n  # consecutive
        self.counts = [{"sent": 0, "failed": 0} for _ in range(n)]  # the ledger's by_endpoint

    def live(self) -> list[int]:
        now = time.monotonic()
        return [i for i, t in enumerate(self.down_until) if t <= now]

    def pick(self) -> int:
        live = self.live()
        if not live:
            return min(range(len(self.down_until)), key=self.down_until.__getitem__)
        return min(live, key=self.inflight.__getitem__)

    def failed(self, i: int) -> None:
        self.failures[i] += 1
        self.counts[i]["failed"] += 1
        self.down_until[i] = time.monotonic() + self.cooldown_s * 2 ** min(self.failures[i] - 1, 4)

    def succeeded(self, i: int) -> None:
        self.failures[i] = 0
        self.down_until[i] = 0.0


class LLMClient:
    """Async client for one model endpoint. Use as `async with LLMClient(...) as client`."""

    def __init__(
        self,
        preset: ModelPreset,
        base_urls: list[str],
        cfg: ClientConfig,
        cache: RequestCache | None = None,
        on_result: Callable[[LLMResult], None] | None = None,
        rng_seed: int = 0,
        ledger: Ledger | None = None,
    ):
        self.preset = preset
        self.cfg = cfg
        self.cache = cache
        self.on_result = on_result
        self.ledger = ledger if ledger is not None else Ledger()
        self.identity = preset.identity()
        self.base_urls = list(base_urls)
        self._sem = asyncio.Semaphore(cfg.concurrency)
        self._rpm = TokenBucket(cfg.requests_per_minute)
        self._tpm = TokenBucket(cfg.tokens_per_minute)
        self._jitter = random.Random(rng_seed)  # jitter only changes timing, never outputs
        # aiohttp under the openai client: httpx's connection pool costs O(connections) per
        # request, which caps a high-concurrency run at ~150 requests/s on 2 cores.
        self._http = openai.DefaultAioHttpClient(
            limits=httpx.Limits(max_connections=cfg.concurrency, max_keepalive_connections=cfg.concurrency),
            timeout=httpx.Timeout(cfg.timeout_s, connect=min(cfg.timeout_s, 10.0)),
        )
        api_key = resolve_api_key(preset)
        # Several base URLs = several replicas of a local server; each request goes to the least busy.
        self._clients = [
            openai.AsyncOpenAI(base_url=url, api_key=api_key, max_retries=0, http_client=self._http, timeout=cfg.timeout_s)
            for url in base_urls
        ]
        self._endpoints = Endpoints(len(self._clients), cfg.endpoint_cooldown_s)
        if len(self._clients) > 1:
            if len(self.ledger.by_endpoint) == len(self._clients):  # a session's earlier call: keep counting
                self._endpoints.counts = self.ledger.by_endpoint
            self.ledger.by_endpoint = self._endpoints.counts
        self._in_flight_usd = 0.0  # worst-case cost of the requests in flight, counted against the budget
        self._budget = asyncio.Condition()
        self.fatal: EndpointRejected | None = None  # the first answer no retry can fix: nothing more is sent
        self.down: str | None = None  # the error that showed every endpoint down: nothing more is sent
        self._wake = asyncio.Event()  # set with fatal or down: requests waiting to be retried give up at once
        self._last_success = float("-inf")

    async def __aenter__(self) -> LLMClient:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    def key(self, req: LLMRequest) -> str:
        return request_key(self.identity, self.preset.api, req.messages, req.prompt, req.params)

    async def generate(self, req: LLMRequest) -> LLMResult:
        """The request's answer (from the cache, else sent with retries), or a failed result (error set) for a
        transport failure. Raises EndpointRejected (an answer no retry can fix, here or in any other request)
        and BudgetExhausted."""
        if self.fatal is not None:
            raise self.fatal
        result = lookup(self.cache, self.preset, req)
        if result is not None:
            self.ledger.cache_hits += 1
            self._account(result)
        else:
            async with self._sem:
                if self.down is not None:  # checked once a slot is free: the endpoint may have gone down meanwhile
                    result = self._failed(req, self.key(req), 0, "not_sent",
                                          f"not sent: the endpoint was down ({self.down} after all retries)")
                else:
                    worst = await self._reserve_budget(req)
                    try:
                        result = await self._send_with_retries(req)
                    finally:
                        await self._release_budget(worst)
        if self.on_result:
            self.on_result(result)
        return result

    @staticmethod
    def _token_estimate(req: LLMRequest) -> tuple[int, int]:
        """(prompt, completion) tokens a request may use at most: ~4 characters a prompt token, max_tokens x n."""
        completion = int(req.params.get("max_tokens") or 0) * int(req.params.get("n") or 1)
        return len(dumps(req.messages or req.prompt)) // 4, completion

    async def _reserve_budget(self, req: LLMRequest) -> float:
        """Reserve the request's worst-case cost against budget_usd, counting what the requests in
        flight may still cost: a request that cannot fit waits for them to settle, and once nothing
        it could still fit in remains, the run stops (BudgetExhausted). So a run never spends past
        its budget however many requests run at once."""
        if not self.cfg.budget_usd:
            return 0.0
        worst = worst_case_usd(self.preset, self.cfg, req)
        async with self._budget:
            while self.ledger.cost_usd_total + self._in_flight_usd + worst > self.cfg.budget_usd:
                if self.ledger.cost_usd_total + worst > self.cfg.budget_usd:
                    raise BudgetExhausted(f"budget of ${self.cfg.budget_usd} reached")
                await self._budget.wait()
            self._in_flight_usd += worst
        return worst

    async def _release_budget(self, worst: float) -> None:
        if worst:
            async with self._budget:
                self._in_flight_usd -= worst
                self._budget.notify_all()

    def _account(self, result: LLMResult, sent: bool = False) -> None:
        led = self.ledger
        led.prompt_tokens += result.usage.get("prompt_tokens", 0)
        led.completion_tokens += result.usage.get("completion_tokens", 0)
        led.cost_usd_total += result.cost_usd
        if sent:
            led.cost_usd_this_run += result.cost_usd

    def _failed(self, req: LLMRequest, key: str, attempts: int, err: str, message: str) -> LLMResult:
        self.ledger.failed += 1
        self.ledger.errors[err] = self.ledger.errors.get(err, 0) + 1
        log.debug("request %s failed after %d attempt(s): %s: %s", req.id, attempts, err, message)
        return LLMResult(id=req.id, key=key, attempts=attempts, error=err, error_message=message[:500])

    async def _sleep(self, seconds: float) -> None:
        """Wait to retry; cut short once the endpoint is down or an answer stopped the run."""
        t0 = time.monotonic()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout=seconds)
        self.ledger.backoff_s += time.monotonic() - t0

    async def _send_with_retries(self, req: LLMRequest) -> LLMResult:
        key = self.key(req)
        estimate = sum(self._token_estimate(req))
        attempts = length_tries = 0
        first_sent = time.monotonic()
        sent = req
        while True:
            if self.fatal is not None:
                raise self.fatal
            attempts += 1
            await self._rpm.take(1)
            await self._tpm.take(estimate)
            self.ledger.requests_sent += 1
            endpoint = self._endpoints.pick()
            try:
                choices, usage = await self._call(sent, endpoint)
            except Exception as exc:  # classified below; anything unknown is a final failure
                self._tpm.give_back(estimate)
                err, retry_after = _classify(exc)
                if is_fatal(err):
                    if self.fatal is None:
                        status = exc.status_code if isinstance(exc, openai.APIStatusError) else err[5:]
                        self.fatal = rejection(self.preset, self.base_urls[endpoint], status, _server_said(exc),
                                               f" to request {req.id}")
                        self._wake.set()
                    raise self.fatal from None
                if err in ENDPOINT_ERRORS:
                    self._endpoints.failed(endpoint)
                if err in RETRYABLE and attempts <= self.cfg.max_retries and self.down is None:
                    if err in ENDPOINT_ERRORS and self._endpoints.live():  # another replica can take it now
                        self.ledger.failovers += 1
                    else:
                        await self._sleep(self._backoff(attempts, retry_after))
                        if self.fatal is not None:
                            raise self.fatal from None
                    if self.down is None:
                        self.ledger.retries += 1
                        continue
                if err in RETRYABLE and self.down is None and self._last_success < first_sent:
                    # Its retries used up and not one request answered since it was first sent: the endpoint is
                    # down, not blinking. What is not sent yet is not sent; a re-run sends it.
                    self.down = err
                    self._wake.set()
                return self._failed(req, key, attempts, err, scrub(f"{type(exc).__name__}: {exc}"))
            self._last_success = time.monotonic()
            self._endpoints.succeeded(endpoint)
            spent = usage["prompt_tokens"] + usage["completion_tokens"]
            self._tpm.give_back(estimate - spent)
            cost = self.preset.price.cost(usage["prompt_tokens"], usage["completion_tokens"])
            cut = any(c["finish_reason"] != "stop" for c in choices)
            retry = length_retry(req, length_tries + 1) if cut and length_tries < self.cfg.length_retries else None
            if retry is not None:
                # The cut answer was paid for: it goes into the ledger, then another sample is asked for.
                length_tries += 1
                self.ledger.retries += 1
                self.ledger.length_retries += 1
                self._account(LLMResult(id=req.id, key=key, usage=usage, cost_usd=cost), sent=True)
                sent = retry
                continue
            # Cached under the original request's key: a re-run gets this very answer without asking.
            result = LLMResult(id=req.id, key=key, choices=choices, usage=usage, cost_usd=cost, attempts=attempts)
            if self.cache is not None:
                self.cache.put(key, self.identity, {"choices": choices, "usage": usage, "cost_usd": cost})
            self._account(result, sent=True)
            return result

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(retry_after, self.cfg.backoff_max_s)
        ceiling = min(self.cfg.backoff_max_s, self.cfg.backoff_base_s * 2 ** (attempt - 1))
        return self._jitter.uniform(0, ceiling)

    async def _call(self, req: LLMRequest, idx: int) -> tuple[list[dict], dict]:
        path, body = request_body(self.preset, req)
        client, ends = self._clients[idx], self._endpoints
        ends.inflight[idx] += 1
        ends.counts[idx]["sent"] += 1
        try:
            # `post` with a plain JSON body: the same client (auth, errors, connection reuse)
            # without the SDK's per-call parameter transform, a third of its CPU per request.
            resp = await client.post(path, body=body, cast_to=ChatCompletion if self.preset.api == "chat" else Completion)
        finally:
            ends.inflight[idx] -= 1
        return parse_answer(self.preset.api, resp)
