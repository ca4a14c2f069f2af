"""The one LLM client: every text generation in the project goes through it.

It speaks the OpenAI protocol (the `openai` package) to any endpoint: a managed local
llama.cpp or vLLM server, the OpenAI API, or any compatible base URL. On top it adds what
a long synthetic-data run needs:

- bounded concurrency and a token bucket on requests and tokens per minute;
- retries with exponential backoff and full jitter on 429, 5xx, timeouts, dropped
  connections and malformed responses, honouring Retry-After, then a recorded failure;
- a content-addressed request cache in SQLite (WAL), durable across kill -9: a resumed
  run re-sends nothing that succeeded, and a re-run with the same config sends nothing;
- a usage ledger (tokens and cost of every paid attempt) and a budget cap that counts what the
  requests in flight may still cost, so a run never spends past it;
- an answer cut at max_tokens is asked again only where that can change it: with another seed
  when sampling, never under greedy decoding (`length_retry`).
- several endpoints serving one model (replicas): each request goes to the live one with the
  fewest in flight; one that fails is left out for a cooldown and the request goes at once to
  another (`Endpoints`), so a server that dies mid-run loses nothing and slows nothing for long.

The cache key is the model's identity (weights, engine and its version, every server setting
that can change a completion: `ModelPreset.identity`), the api, the exact messages or prompt
and every sampling parameter, the seed included; not the port, log path or worker count.

Own code, not libraries, for two small pieces: the token bucket, because aiolimiter cannot hand
back an over-estimated token charge once the response's real usage is known; the retry loop
(~25 lines), because each attempt feeds the ledger, that correction and the length-retry rule,
which tenacity's callbacks would split across four hooks.

    python -c "import asyncio; from pipeline.engines.llm import *; print(request_key('m', 'chat', [{'role':'user','content':'hi'}], None, {}))"
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import random
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import openai
from openai.types import Completion
from openai.types.chat import ChatCompletion

from pipeline.core.config import ClientConfig, ConfigError, ModelPreset
from pipeline.core.records import dumps, sha256_text

log = logging.getLogger(__name__)

# Error classes recorded when a request finally fails, and whether they are retried.
RETRYABLE = {"rate_limit", "server_error", "timeout", "connection", "malformed_response"}
# Errors that say the endpoint (not the request, not the account's rate) is in trouble: fail over.
ENDPOINT_ERRORS = {"server_error", "timeout", "connection"}


class BudgetExhausted(RuntimeError):
    """The budget cap is reached: no new request is sent."""


def request_key(model_identity: str, api: str, messages: list | None, prompt: str | None, params: dict) -> str:
    """Content address of a request: model identity, api, input and every sampling parameter (seed included)."""
    return sha256_text(dumps({"model": model_identity, "api": api, "messages": messages, "prompt": prompt, "params": params}))


def resolve_api_key(preset: ModelPreset) -> str:
    """The key comes from the environment only; a remote endpoint without one fails before any work."""
    if preset.api_key_env:
        key = os.environ.get(preset.api_key_env, "")
        if not key:
            raise ConfigError(
                f"preset '{preset.name}' needs an API key in the environment variable {preset.api_key_env}, which is not set"
            )
        return key
    return "not-needed"  # local servers ignore the key; the openai package insists on one


@dataclass
class LLMRequest:
    id: str
    messages: list[dict] | None = None
    prompt: str | None = None
    params: dict = field(default_factory=dict)


@dataclass
class LLMResult:
    id: str
    key: str
    choices: list[dict] = field(default_factory=list)  # [{"text": ..., "finish_reason": ...}]
    usage: dict = field(default_factory=lambda: {"prompt_tokens": 0, "completion_tokens": 0})
    cost_usd: float = 0.0
    cached: bool = False
    attempts: int = 0
    error: str | None = None  # error class when the request finally failed
    error_message: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


class RequestCache:
    """SQLite in WAL mode: each finished request is committed before it is used, so kill -9 loses none."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode survives a process crash (kill -9); only an OS crash can lose the last commits.
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS responses (key TEXT PRIMARY KEY, model TEXT, response TEXT, created REAL)"
        )

    def get(self, key: str) -> dict | None:
        row = self._db.execute("SELECT response FROM responses WHERE key=?", (key,)).fetchone()
        return json.loads(row[0]) if row else None

    def put(self, key: str, model: str, response: dict) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO responses VALUES (?, ?, ?, ?)", (key, model, dumps(response), time.time())
        )

    def __len__(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM responses").fetchone()[0]

    def close(self) -> None:
        self._db.close()


class TokenBucket:
    """Refills `per_minute` units per minute with a one-second burst; a larger single take runs into debt."""

    def __init__(self, per_minute: float):
        self.rate = per_minute / 60.0
        self.capacity = max(self.rate, 1.0)
        self.tokens = self.capacity
        self.stamp = time.monotonic()
        self._lock = asyncio.Lock()

    def _refill(self) -> None:
        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now

    async def take(self, amount: float) -> None:
        if self.rate <= 0:
            return
        async with self._lock:
            need = min(amount, self.capacity)
            self._refill()
            while self.tokens < need:
                await asyncio.sleep((need - self.tokens) / self.rate)
                self._refill()
            self.tokens -= amount

    def give_back(self, amount: float) -> None:
        """Correct an estimate once the real usage is known (negative amount = take more)."""
        if self.rate > 0:
            self._refill()
            self.tokens = min(self.capacity, self.tokens + amount)


@dataclass
class Ledger:
    """Usage of one run. `*_total` covers every record of the dataset, cached ones included."""

    requests_sent: int = 0
    cache_hits: int = 0
    failed: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd_total: float = 0.0
    cost_usd_this_run: float = 0.0
    length_retries: int = 0  # answers cut at max_tokens, paid for, then asked again with another seed
    failovers: int = 0  # retries sent at once to another endpoint after one failed
    errors: dict = field(default_factory=dict)
    by_endpoint: list = field(default_factory=list)  # with several endpoints: [{"sent", "failed"}] in preset order

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d["cost_usd_total"] = round(self.cost_usd_total, 6)
        d["cost_usd_this_run"] = round(self.cost_usd_this_run, 6)
        return d


def _classify(exc: BaseException) -> tuple[str, float | None]:
    """(error class, Retry-After seconds if the server sent one)."""
    if isinstance(exc, openai.APIStatusError):
        retry_after = None
        header = exc.response.headers.get("retry-after") if exc.response is not None else None
        if header:
            try:
                retry_after = float(header)
            except ValueError:
                retry_after = None
        if exc.status_code == 429:
            return "rate_limit", retry_after
        if exc.status_code >= 500:
            return "server_error", retry_after
        return f"http_{exc.status_code}", None
    if isinstance(exc, openai.APITimeoutError):
        # The aiohttp transport reports a refused connection as a connect timeout: look at the cause.
        cause = exc.__cause__ or exc.__context__
        while cause is not None:
            if isinstance(cause, (ConnectionError, aiohttp.ClientConnectorError)):
                return "connection", None
            cause = cause.__cause__ or cause.__context__
        return "timeout", None
    if isinstance(exc, openai.APIConnectionError):
        return "connection", None
    if isinstance(exc, (json.JSONDecodeError, openai.APIResponseValidationError, ValueError, KeyError, TypeError)):
        return "malformed_response", None
    return type(exc).__name__, None


def length_retry(req: LLMRequest, attempt: int) -> LLMRequest | None:
    """The request to send after an answer cut at max_tokens, or None when asking again cannot help.

    A server answers the same request the same way (greedy decoding, or sampling with the same
    seed), so a retry must change what decides the answer: sampling gets another seed, derived
    from the original one so a cold re-run asks the same sequence of questions. Greedy decoding
    (temperature 0) would return the same truncation, so no retry is made.
    """
    p = req.params
    if not p.get("temperature"):
        return None
    seed = (int(p.get("seed") or 0) + 1_000_003 * attempt) % (2**31)
    return dataclasses.replace(req, params={**p, "seed": seed})


def lookup(cache: RequestCache | None, preset: ModelPreset, req: LLMRequest) -> LLMResult | None:
    """The cached result of a request, or None. Lets a stage skip starting a server when all are cached."""
    if cache is None:
        return None
    key = request_key(preset.identity(), preset.api, req.messages, req.prompt, req.params)
    hit = cache.get(key)
    if hit is None:
        return None
    return LLMResult(id=req.id, key=key, choices=hit["choices"], usage=hit["usage"],
                     cost_usd=hit["cost_usd"], cached=True, attempts=0)


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
    ):
        self.preset = preset
        self.cfg = cfg
        self.cache = cache
        self.on_result = on_result
        self.ledger = Ledger()
        self.identity = preset.identity()
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
            self.ledger.by_endpoint = self._endpoints.counts
        self._in_flight_usd = 0.0  # worst-case cost of the requests in flight, counted against the budget
        self._budget = asyncio.Condition()

    async def __aenter__(self) -> LLMClient:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    def key(self, req: LLMRequest) -> str:
        return request_key(self.identity, self.preset.api, req.messages, req.prompt, req.params)

    async def generate(self, req: LLMRequest) -> LLMResult:
        result = lookup(self.cache, self.preset, req)
        if result is not None:
            self.ledger.cache_hits += 1
            self._account(result)
        else:
            async with self._sem:
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
        # Every paid attempt counts: a sampled answer cut at max_tokens is asked again up to length_retries times.
        paid_attempts = 1 + (self.cfg.length_retries if req.params.get("temperature") else 0)
        worst = paid_attempts * self.preset.price.cost(*self._token_estimate(req))
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

    async def _send_with_retries(self, req: LLMRequest) -> LLMResult:
        key = self.key(req)
        estimate = sum(self._token_estimate(req))
        attempts = length_tries = 0
        sent = req
        while True:
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
                if err in ENDPOINT_ERRORS:
                    self._endpoints.failed(endpoint)
                if err in RETRYABLE and attempts <= self.cfg.max_retries:
                    self.ledger.retries += 1
                    if err in ENDPOINT_ERRORS and self._endpoints.live():  # another replica can take it now
                        self.ledger.failovers += 1
                    else:
                        await asyncio.sleep(self._backoff(attempts, retry_after))
                    continue
                self.ledger.failed += 1
                self.ledger.errors[err] = self.ledger.errors.get(err, 0) + 1
                log.warning("request %s failed after %d attempt(s): %s: %s", req.id, attempts, err, exc)
                return LLMResult(id=req.id, key=key, attempts=attempts, error=err, error_message=str(exc)[:500])
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
        p = dict(req.params)
        kwargs: dict[str, Any] = {"model": self.preset.model}
        for name in ("temperature", "top_p", "max_tokens", "n", "seed"):
            if p.get(name) is not None:
                kwargs[name] = p[name]
        if p.get("stop"):
            kwargs["stop"] = p["stop"]
        client, ends = self._clients[idx], self._endpoints
        ends.inflight[idx] += 1
        ends.counts[idx]["sent"] += 1
        try:
            # `post` with a plain JSON body: the same client (auth, errors, connection reuse)
            # without the SDK's per-call parameter transform, a third of its CPU per request.
            if self.preset.api == "chat":
                if self.preset.engine == "vllm" and req.messages[-1]["role"] == "assistant":
                    # A begun answer to continue (a prefill): llama-server does so by default, vLLM when asked.
                    kwargs.update(continue_final_message=True, add_generation_prompt=False)
                resp = await client.post("/chat/completions", body={**kwargs, "messages": req.messages},
                                         cast_to=ChatCompletion)
                choices = [{"text": c.message.content or "", "finish_reason": c.finish_reason} for c in resp.choices]
            else:
                resp = await client.post("/completions", body={**kwargs, "prompt": req.prompt}, cast_to=Completion)
                choices = [{"text": c.text or "", "finish_reason": c.finish_reason} for c in resp.choices]
        finally:
            ends.inflight[idx] -= 1
        if not choices:
            raise ValueError("response has no choices")
        u = resp.usage
        usage = {
            "prompt_tokens": int(getattr(u, "prompt_tokens", 0) or 0),
            "completion_tokens": int(getattr(u, "completion_tokens", 0) or 0),
        }
        return choices, usage
