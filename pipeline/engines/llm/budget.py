"""Rate and spend: the token bucket on requests and tokens per minute, the usage ledger of a run, and
the worst-case cost of a request that the budget cap reserves before it is sent."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from pipeline.core.config import ClientConfig, ModelPreset
from pipeline.core.records import dumps
from pipeline.engines.llm.protocol import LLMRequest


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


def worst_case_usd(preset: ModelPreset, cfg: ClientConfig, req: LLMRequest, batch: bool = False) -> float:
    """What a request may cost at most: every paid attempt (a sampled answer cut at max_tokens is asked again up
    to length_retries times) at ~4 characters a prompt token and max_tokens x n completion tokens."""
    paid_attempts = 1 + (cfg.length_retries if req.params.get("temperature") else 0)
    completion = int(req.params.get("max_tokens") or 0) * int(req.params.get("n") or 1)
    return paid_attempts * preset.price.cost(len(dumps(req.messages or req.prompt)) // 4, completion, batch=batch)
