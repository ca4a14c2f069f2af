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
- a failure policy (`LLMSession`, the one entry every stage calls): a request that fails for a
  transport reason after its retries (TRANSPORT) is never a final answer: the stage finishes the
  others, caches every answer, and stops with one line naming the endpoint, the error kinds and
  "run again: only the N failed requests are sent" (`RequestsFailed`), unless
  client.max_failed_fraction accepts the loss. Once a request has used up its retries with no
  request answered since it was first sent, the endpoint is down: the requests not yet sent are
  not sent (`not_sent`), so a run against a dead endpoint stops in one request's retry span. An
  answer no retry can fix (401/403 key, 404 model or URL, 400 request shape) stops the run at once,
  naming the preset, the URL and what the server said, never the key (`EndpointRejected`).
- the OpenAI Batch API (`client.batch`, pipeline/engines/batch.py): the same requests, cache and
  ledger, at the batch price.

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
import contextlib
import dataclasses
import json
import logging
import os
import random
import re
import sqlite3
import time
from collections import Counter
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import openai
from openai.types import Completion
from openai.types.chat import ChatCompletion
from tqdm import tqdm

from pipeline.core.config import ClientConfig, ConfigError, ModelPreset
from pipeline.core.records import dumps, sha256_text

log = logging.getLogger(__name__)

# Error classes recorded when a request finally fails, and whether they are retried.
RETRYABLE = {"rate_limit", "server_error", "timeout", "connection", "malformed_response"}
# Errors that say the endpoint (not the request, not the account's rate) is in trouble: fail over.
ENDPOINT_ERRORS = {"server_error", "timeout", "connection"}
# Failures a re-run can cure: the request was fine, the endpoint or the network was not. Never a final
# answer (a rejected record, a wrong answer): the stage stops unless client.max_failed_fraction allows them.
# "not_sent": left unsent once the endpoint was found down; "batch_*": a Batch API item that expired,
# was cancelled or never came back.
TRANSPORT = RETRYABLE | {"not_sent", "batch_expired", "batch_cancelled", "batch_failed", "batch_missing"}


class BudgetExhausted(RuntimeError):
    """The budget cap is reached: no new request is sent."""


class LLMError(RuntimeError):
    """A stage's requests cannot all be answered; the message is the one line the user sees."""


class EndpointRejected(LLMError):
    """An answer no retry can fix (401/403 key, 404 model or URL, 400/422 request shape): the run stops at once."""


class RequestsFailed(LLMError):
    """Requests failed for a transport reason after their retries, more than client.max_failed_fraction allows."""


_KEY_LIKE = re.compile(r"\b((?:sk|Bearer)[-_ ]?[A-Za-z0-9]{0,4})[A-Za-z0-9_\-*]{8,}")


def scrub(text: str, key: str | None = None) -> str:
    """`text` with the API key, and anything shaped like a key, masked: what a server says may quote it."""
    if key and len(key) >= 4 and key != "not-needed":
        text = text.replace(key, "***")
    return _KEY_LIKE.sub(r"\1***", text)


def is_fatal(err: str) -> bool:
    """An HTTP answer no retry can fix: any 4xx but 408 (timeout) and 429 (rate), which are retried."""
    return err.startswith("http_") and err[5:].isdigit() and 400 <= int(err[5:]) < 500


def rejection(preset: ModelPreset, url: str, status: int | str, said: str, what: str = "") -> EndpointRejected:
    """The one line for an answer no retry can fix: preset, URL, status, what the server said, what to check."""
    hints = {401: f"check the API key in ${preset.api_key_env}" if preset.api_key_env else "the endpoint wants a key",
             403: f"the key in ${preset.api_key_env} may not use this model or endpoint" if preset.api_key_env
             else "the endpoint refused access",
             404: f"check the model '{preset.model}' and the base URL",
             400: "the endpoint refused the request's shape", 422: "the endpoint refused the request's shape"}
    code = int(status) if str(status).isdigit() else 0
    hint = hints.get(code, "no retry can fix it")
    said = scrub(" ".join(str(said).split()), resolve_api_key(preset, missing_ok=True))[:300]
    verb = f"answered HTTP {status}" if code else str(status)
    return EndpointRejected(f"preset '{preset.name}' at {url} {verb}{what}: {said or '(no message)'}; "
                            f"{hint}; stopped without retrying")


def _server_said(exc: openai.APIStatusError) -> str:
    body = exc.body
    if isinstance(body, dict):
        inner = body.get("error") if isinstance(body.get("error"), dict) else body
        if inner.get("message"):
            return str(inner["message"])
    try:
        return exc.response.text[:300] if exc.response is not None else str(exc)
    except Exception:  # a streamed or closed body
        return str(exc)


def request_key(model_identity: str, api: str, messages: list | None, prompt: str | None, params: dict) -> str:
    """Content address of a request: model identity, api, input and every sampling parameter (seed included)."""
    return sha256_text(dumps({"model": model_identity, "api": api, "messages": messages, "prompt": prompt, "params": params}))


def resolve_api_key(preset: ModelPreset, missing_ok: bool = False) -> str:
    """The key comes from the environment only; a remote endpoint without one fails before any work."""
    if preset.api_key_env:
        key = os.environ.get(preset.api_key_env, "")
        if not key and not missing_ok and preset.api_key_optional:  # an endpoint that may want no key
            return "not-needed"
        if not key and not missing_ok:
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

    @property
    def db(self) -> sqlite3.Connection:
        """The connection, for the Batch API's submissions table (pipeline.engines.batch) beside the answers."""
        return self._db

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
    backoff_s: float = 0.0  # time requests spent waiting to be retried
    batches_submitted: int = 0  # Batch API: batches created by this run
    batches_resumed: int = 0  # Batch API: batches an earlier (killed) run submitted, polled instead of resubmitted
    errors: dict = field(default_factory=dict)
    by_endpoint: list = field(default_factory=list)  # with several endpoints: [{"sent", "failed"}] in preset order

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d["cost_usd_total"] = round(self.cost_usd_total, 6)
        d["cost_usd_this_run"] = round(self.cost_usd_this_run, 6)
        d["backoff_s"] = round(self.backoff_s, 3)
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
        if exc.status_code == 408:
            return "timeout", retry_after
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


def request_body(preset: ModelPreset, req: LLMRequest) -> tuple[str, dict]:
    """(path under the base URL, JSON body) of a request: the same body whether it is sent alone or in a batch file."""
    p = req.params
    body: dict[str, Any] = {"model": preset.model}
    for name in ("temperature", "top_p", "max_tokens", "n", "seed"):
        if p.get(name) is not None:
            body[name] = p[name]
    if p.get("stop"):
        body["stop"] = p["stop"]
    if preset.api == "chat":
        if preset.engine == "vllm" and req.messages[-1]["role"] == "assistant":
            # A begun answer to continue (a prefill): llama-server does so by default, vLLM when asked.
            body.update(continue_final_message=True, add_generation_prompt=False)
        return "/chat/completions", {**body, "messages": req.messages}
    return "/completions", {**body, "prompt": req.prompt}


def _field(obj: Any, name: str) -> Any:
    return obj.get(name) if isinstance(obj, dict) else getattr(obj, name, None)


def parse_answer(api: str, resp: Any) -> tuple[list[dict], dict]:
    """(choices, usage) of a completion, as the SDK's model (sent alone) or a plain dict (a batch output line)."""
    choices = []
    for c in _field(resp, "choices") or []:
        text = _field(_field(c, "message") or {}, "content") if api == "chat" else _field(c, "text")
        choices.append({"text": text or "", "finish_reason": _field(c, "finish_reason")})
    if not choices:
        raise ValueError("response has no choices")
    u = _field(resp, "usage") or {}
    return choices, {"prompt_tokens": int(_field(u, "prompt_tokens") or 0),
                     "completion_tokens": int(_field(u, "completion_tokens") or 0)}


def worst_case_usd(preset: ModelPreset, cfg: ClientConfig, req: LLMRequest, batch: bool = False) -> float:
    """What a request may cost at most: every paid attempt (a sampled answer cut at max_tokens is asked again up
    to length_retries times) at ~4 characters a prompt token and max_tokens x n completion tokens."""
    paid_attempts = 1 + (cfg.length_retries if req.params.get("temperature") else 0)
    completion = int(req.params.get("max_tokens") or 0) * int(req.params.get("n") or 1)
    return paid_attempts * preset.price.cost(len(dumps(req.messages or req.prompt)) // 4, completion, batch=batch)


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


# ---------------------------------------------------------------------------------------
# The one entry the stages call: a list of requests in, answers out, the failure policy applied
# ---------------------------------------------------------------------------------------


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
