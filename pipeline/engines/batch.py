"""The OpenAI Batch API (`client.batch: true`): the same requests, request cache and ledger, at the batch price.

`LLMSession.complete` hands the requests that are not cached to `BatchRunner.run`, which:

1. writes them as JSONL batch files, one line per request: custom_id = the request's cache key, the
   body exactly as it would be sent alone (`llm.request_body`); at most client.batch_max_requests
   lines and 190 MB a file (the API's limits: 50,000 requests, 200 MB);
2. counts each file at its worst case (every paid attempt at max_tokens, at the batch price) against
   client.budget_usd before submitting it: requests that no longer fit are not submitted;
3. saves the submission (its items) in the request cache's SQLite before uploading anything, then the
   file id and the batch id as soon as the API returns them (`files.create(purpose="batch")`,
   `batches.create(..., metadata={"textbook_submission": id})`). A run killed at any point resumes by
   polling the same batches instead of paying twice; a batch created whose id was not saved yet is
   found again by its metadata (`batches.list`);
4. polls every client.batch_poll_s (progress: the batches' request counts), then reads the output and
   error files: each answer goes into the request cache under its custom_id and into the ledger at
   the preset's batch price (`price.batch_*_per_mtok`); a sampled answer cut at max_tokens is asked
   again with another seed in the next batch, as online (`length_retry`);
5. submits the items that failed or expired once more, then hands back what still failed: the
   session's failure policy (`RequestsFailed`) takes it from there. An item answered 4xx (but 408,
   429) or a batch refused as a whole stops the run (`EndpointRejected`), after caching the rest.

The stage then builds its outputs from the cache as usual, so a batch run and an online run from the
same cache write the same dataset.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from typing import Any

import openai
from tqdm import tqdm

from pipeline.core.config import ClientConfig, ModelPreset
from pipeline.core.records import dumps
from pipeline.engines.llm import (
    Ledger,
    LLMRequest,
    LLMResult,
    RequestCache,
    RequestsFailed,
    is_fatal,
    length_retry,
    parse_answer,
    rejection,
    request_body,
    request_key,
    resolve_api_key,
    scrub,
    worst_case_usd,
)
from pipeline.engines.llm.errors import _classify, _server_said  # the client's own error classification

log = logging.getLogger(__name__)

MAX_FILE_BYTES = 190 * 1024 * 1024  # the API takes 200 MB a file
OPEN = ("validating", "in_progress", "finalizing", "cancelling")
TERMINAL = ("completed", "expired", "cancelled", "failed")
ITEM_ERRORS = {"batch_expired": "batch_expired", "batch_cancelled": "batch_cancelled"}


@dataclass
class Submission:
    """One batch file and its batch, as saved in the request cache's SQLite (table batch_submissions)."""

    id: str
    items: dict[str, dict]  # custom_id (the key of the request sent) -> {"key": the original request's key, "try": n}
    worst_usd: float
    created: float
    file_id: str | None = None
    batch_id: str | None = None
    status: str = "new"


class SubmissionStore:
    """The submissions of one model identity and endpoint, beside the answers in the request cache."""

    def __init__(self, cache: RequestCache, identity: str, base_url: str):
        self.db, self.identity, self.base_url = cache.db, identity, base_url
        self.db.execute("CREATE TABLE IF NOT EXISTS batch_submissions (id TEXT PRIMARY KEY, model TEXT, base_url TEXT, "
                        "items TEXT, worst_usd REAL, created REAL, file_id TEXT, batch_id TEXT, status TEXT, "
                        "closed INTEGER NOT NULL DEFAULT 0)")

    def open(self) -> list[Submission]:
        rows = self.db.execute("SELECT id, items, worst_usd, created, file_id, batch_id, status FROM batch_submissions "
                               "WHERE model=? AND base_url=? AND closed=0 ORDER BY created, id",
                               (self.identity, self.base_url)).fetchall()
        return [Submission(r[0], json.loads(r[1]), r[2], r[3], r[4], r[5], r[6]) for r in rows]

    def add(self, sub: Submission) -> None:
        self.db.execute("INSERT INTO batch_submissions (id, model, base_url, items, worst_usd, created, status) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (sub.id, self.identity, self.base_url, dumps(sub.items), sub.worst_usd, sub.created, sub.status))

    def update(self, sub: Submission, closed: bool = False) -> None:
        self.db.execute("UPDATE batch_submissions SET file_id=?, batch_id=?, status=?, closed=? WHERE id=?",
                        (sub.file_id, sub.batch_id, sub.status, int(closed), sub.id))


class BatchRunner:
    """Completes requests through the Batch API: answers into the cache, failures handed back."""

    def __init__(self, preset: ModelPreset, cfg: ClientConfig, cache: RequestCache, ledger: Ledger,
                 progress: bool = False, desc: str = "requests"):
        self.preset, self.cfg, self.cache, self.ledger = preset, cfg, cache, ledger
        self.progress, self.desc = progress, desc
        self.identity = preset.identity()
        self.url = str(preset.base_url)
        self.store = SubmissionStore(cache, self.identity, self.url)
        # The SDK's own retries (with backoff) for the few control calls: uploads, creates, polls, downloads.
        self.client = openai.AsyncOpenAI(base_url=self.url, api_key=resolve_api_key(preset),
                                         max_retries=cfg.max_retries, timeout=cfg.timeout_s)
        self.requests: dict[str, LLMRequest] = {}  # original key -> request
        self.reserved_usd = 0.0  # worst case of the submitted batches not read yet

    def _key(self, req: LLMRequest) -> str:
        return request_key(self.identity, self.preset.api, req.messages, req.prompt, req.params)

    def _sent(self, key: str, attempt: int) -> LLMRequest:
        """The request sent for an original key: itself, or its `attempt`-th reseeded ask after a cut answer."""
        req = self.requests[key]
        return req if attempt == 0 else length_retry(req, attempt)

    async def run(self, pending: list[LLMRequest]) -> tuple[dict[str, LLMResult], set[str]]:
        """(failed results by original key, keys not submitted because of the budget); answers are in the cache."""
        for req in pending:
            self.requests.setdefault(self._key(req), req)
        failed: dict[str, LLMResult] = {}
        not_attempted: set[str] = set()
        tries: Counter = Counter()  # custom_id -> submissions in this run (an adopted one counts)
        subs = [s for s in self.store.open() if any(i["key"] in self.requests for i in s.items.values())]
        if subs:
            log.info("resuming %d batch(es) submitted by an earlier run (%d requests): polled, not submitted again",
                     len(subs), sum(len(s.items) for s in subs))
        try:
            async with self.client:
                subs = [s for s in [await self._launch(s) for s in subs] if s is not None]
                for sub in subs:
                    tries.update(list(sub.items))  # its custom_ids: adopting it counts as one submission
                    self.reserved_usd += sub.worst_usd
                    self.ledger.batches_resumed += 1
                in_flight = {i["key"] for s in subs for i in s.items.values()}
                queue = [(k, 0) for k in self.requests if k not in in_flight]
                while queue or subs:
                    if queue:
                        new, skipped = await self._submit(queue, tries)
                        not_attempted |= skipped
                        subs += new
                        queue = []
                    done = await self._wait(subs)
                    subs = []
                    for sub, batch in done:
                        for cid, result, again in await self._read(sub, batch):
                            meta = sub.items[cid]
                            if meta["key"] not in self.requests:  # an earlier run's request this one does not need
                                continue
                            if again is not None:  # a cut answer: another seed, in the next batch
                                queue.append((meta["key"], again))
                            elif result is not None and tries[cid] < 2:  # failed or expired: once more
                                queue.append((meta["key"], meta["try"]))
                            elif result is not None:
                                failed[meta["key"]] = result
        except openai.APIStatusError as exc:
            err, _ = _classify(exc)
            if is_fatal(err):
                raise rejection(self.preset, self.url, exc.status_code, _server_said(exc)) from None
            raise self._unreachable(err, failed) from None
        except (openai.APIConnectionError, openai.APITimeoutError) as exc:
            raise self._unreachable(_classify(exc)[0], failed) from None
        return failed, not_attempted

    def _unreachable(self, err: str, failed: dict[str, LLMResult]) -> RequestsFailed:
        """A control call (upload, create, poll, download) that failed after the SDK's retries: one line."""
        saved = [s for s in self.store.open() if any(i["key"] in self.requests for i in s.items.values())]
        in_saved = {i["key"] for s in saved for i in s.items.values()}
        answered = sum(1 for k in self.requests if self.cache.get(k) is not None)
        n = len(self.requests) - answered - len(in_saved)
        return RequestsFailed(
            f"{n} request(s) failed at preset '{self.preset.name}' (Batch API at {self.url}) ({err}: {n}); "
            f"{answered} answered and cached"
            + (f"; {len(in_saved)} in {len(saved)} submitted batch(es) are polled on the next run, not sent again"
               if saved else "") + f"; run again: only the {n} failed requests are sent")

    # -- submitting -------------------------------------------------------------------------

    async def _submit(self, queue: list[tuple[str, int]], tries: Counter) -> tuple[list[Submission], set[str]]:
        """Files of at most batch_max_requests lines and MAX_FILE_BYTES, each counted at its worst case against
        the budget before it is submitted; the requests that no longer fit (in order) are not submitted."""
        budget = self.cfg.budget_usd
        chunks: list[tuple[dict[str, dict], list[bytes], float]] = []
        items: dict[str, dict] = {}
        lines: list[bytes] = []
        size = worst_sum = 0.0
        skipped: set[str] = set()
        for key, attempt in queue:
            if skipped:
                skipped.add(key)
                continue
            sent = self._sent(key, attempt)
            # A reseeded ask after a cut answer: one more paid attempt (the first submission counted them all).
            cfg = self.cfg if attempt == 0 else dataclasses.replace(self.cfg, length_retries=0)
            worst = worst_case_usd(self.preset, cfg, sent, batch=True)
            if budget and self.ledger.cost_usd_total + self.reserved_usd + worst > budget:
                skipped.add(key)
                continue
            self.reserved_usd += worst
            cid = self._key(sent)
            path, body = request_body(self.preset, sent)
            line = (dumps({"custom_id": cid, "method": "POST", "url": "/v1" + path, "body": body}) + "\n").encode()
            if items and (len(items) >= self.cfg.batch_max_requests or size + len(line) > MAX_FILE_BYTES):
                chunks.append((items, lines, worst_sum))
                items, lines, size, worst_sum = {}, [], 0.0, 0.0
            items[cid] = {"key": key, "try": attempt}
            lines.append(line)
            size += len(line)
            worst_sum += worst
            tries[cid] += 1
        if items:
            chunks.append((items, lines, worst_sum))
        if skipped:
            log.warning("budget of $%s: %d request(s) not submitted (the submitted batches' worst case fills it)",
                        budget, len(skipped))
        subs = []
        for items, lines, worst_sum in chunks:
            sub = Submission(uuid.uuid4().hex, items, worst_sum, time.time())
            self.store.add(sub)  # saved before anything is uploaded: a kill from here on resumes this submission
            sub = await self._launch(sub, b"".join(lines))
            if sub is not None:
                subs.append(sub)
        return subs, skipped

    async def _launch(self, sub: Submission, data: bytes | None = None) -> Submission | None:
        """Upload the submission's file and create its batch, whichever is not done yet (a resumed one may be
        half done); None when a resumed submission never got uploaded and cannot be rebuilt (closed: nothing paid)."""
        if sub.batch_id is None and sub.file_id is None:
            if data is None:  # resumed before its upload: rebuild the file from the requests
                if not all(i["key"] in self.requests for i in sub.items.values()):
                    sub.status = "abandoned"
                    self.store.update(sub, closed=True)
                    return None
                data = b"".join((dumps({"custom_id": cid, "method": "POST", "url": "/v1" + path, "body": body})
                                 + "\n").encode()
                                for cid, meta in sub.items.items()
                                for path, body in [request_body(self.preset, self._sent(meta["key"], meta["try"]))])
            f = await self.client.files.create(file=(f"textbook-{sub.id}.jsonl", data, "application/jsonl"),
                                               purpose="batch")
            sub.file_id, sub.status = f.id, "uploaded"
            self.store.update(sub)
        if sub.batch_id is None:
            found = await self._find(sub) if data is None else None
            endpoint = "/v1/chat/completions" if self.preset.api == "chat" else "/v1/completions"
            batch = found or await self.client.batches.create(
                input_file_id=sub.file_id, endpoint=endpoint, completion_window="24h",
                metadata={"textbook_submission": sub.id})
            sub.batch_id, sub.status = batch.id, batch.status
            self.store.update(sub)  # the batch id, saved before anything else happens
            if found is None:
                self.ledger.batches_submitted += 1
                self.ledger.requests_sent += len(sub.items)
            log.info("batch %s: %d request(s) %s", batch.id, len(sub.items),
                     "found again (submitted before a kill)" if found else "submitted")
        return sub

    async def _find(self, sub: Submission) -> Any:
        """The batch created for a submission whose batch id was not saved (a kill right after the create)."""
        async for batch in self.client.batches.list(limit=100):
            if (batch.metadata or {}).get("textbook_submission") == sub.id or batch.input_file_id == sub.file_id:
                return batch
            if batch.created_at < sub.created - 3600:  # newest first: older ones cannot be it
                break
        return None

    # -- waiting and reading ------------------------------------------------------------------

    async def _wait(self, subs: list[Submission]) -> list[tuple[Submission, Any]]:
        """Poll until every batch has ended; progress shows their request counts."""
        done: dict[str, Any] = {}
        total = sum(len(s.items) for s in subs)
        with tqdm(total=total, desc=f"{self.desc} (batch)", unit="req", disable=not self.progress) as bar:
            while len(done) < len(subs):
                finished = failed = 0
                for sub in subs:
                    batch = done.get(sub.id) or await self.client.batches.retrieve(sub.batch_id)
                    if batch.status != sub.status:
                        log.info("batch %s: %s", batch.id, batch.status)
                        sub.status = batch.status
                        self.store.update(sub)
                    if batch.status in TERMINAL:
                        done[sub.id] = batch
                    counts = batch.request_counts
                    if counts is not None:
                        finished += counts.completed + counts.failed
                        failed += counts.failed
                bar.n = min(finished, total)
                bar.set_postfix(batches=f"{len(done)}/{len(subs)} ended", failed=failed, refresh=False)
                bar.refresh()
                if len(done) < len(subs):
                    await asyncio.sleep(self.cfg.batch_poll_s)
        return [(s, done[s.id]) for s in subs]

    async def _read(self, sub: Submission, batch: Any) -> list[tuple[str, LLMResult | None, int | None]]:
        """Every item of an ended batch: (custom_id, failed result or None, next try after a cut answer or None).
        Answers go into the cache and ledger; the submission is closed once all are read."""
        self.reserved_usd -= sub.worst_usd
        if batch.status == "failed":  # refused as a whole (the file, the model, the endpoint)
            errors = getattr(batch.errors, "data", None) or []
            said = "; ".join(f"{e.code}: {e.message}" for e in errors[:3]) or "no reason given"
            sub.status = "failed"
            self.store.update(sub, closed=True)
            raise rejection(self.preset, self.url, "refused the batch", said, f" {batch.id}")
        lines: list[str] = []
        for file_id in (batch.output_file_id, batch.error_file_id):
            if file_id:
                lines += (await self.client.files.content(file_id)).text.splitlines()
        out: list[tuple[str, LLMResult | None, int | None]] = []
        seen: set[str] = set()
        fatal = None
        for line in lines:
            if not line.strip():
                continue
            item = json.loads(line)
            cid = item.get("custom_id")
            if cid not in sub.items or cid in seen:
                continue
            seen.add(cid)
            meta = sub.items[cid]
            resp = item.get("response") or {}
            status = resp.get("status_code")
            if status == 200:
                try:
                    choices, usage = parse_answer(self.preset.api, resp.get("body") or {})
                except (ValueError, TypeError, KeyError, AttributeError) as exc:
                    out.append((cid, self._failure(meta, "malformed_response", str(exc)), None))
                    continue
                out.append((cid, None, self._answer(meta, choices, usage)))
                continue
            error = item.get("error") if isinstance(item.get("error"), dict) else {}
            body = resp.get("body") if isinstance(resp.get("body"), dict) else {}
            said = (body.get("error") or {}).get("message") if isinstance(body.get("error"), dict) else None
            said = said or error.get("message") or ""
            if status is None:
                kind = ITEM_ERRORS.get(str(error.get("code")), "batch_failed")
            elif status == 429:
                kind = "rate_limit"
            elif status == 408:
                kind = "timeout"
            elif status >= 500:
                kind = "server_error"
            else:
                kind = f"http_{status}"
                fatal = fatal or (status, said, cid)
            out.append((cid, self._failure(meta, kind, said), None))
        missing = "batch_expired" if batch.status == "expired" else \
            "batch_cancelled" if batch.status == "cancelled" else "batch_missing"
        out += [(cid, self._failure(meta, missing, f"no answer in batch {batch.id}"), None)
                for cid, meta in sub.items.items() if cid not in seen]
        sub.status = batch.status
        self.store.update(sub, closed=True)  # after the answers are cached: a kill before this reads them again
        if fatal is not None:
            raise rejection(self.preset, self.url, fatal[0], fatal[1], f" to a request in batch {batch.id}")
        return out

    def _failure(self, meta: dict, kind: str, said: str) -> LLMResult:
        return LLMResult(id="", key=meta["key"], attempts=meta["try"] + 1, error=kind, error_message=scrub(said)[:500])

    def _answer(self, meta: dict, choices: list[dict], usage: dict) -> int | None:
        """Account an answer; cache it under the original key, or return the next try for a cut sampled one."""
        led = self.ledger
        cost = self.preset.price.cost(usage["prompt_tokens"], usage["completion_tokens"], batch=True)
        led.prompt_tokens += usage["prompt_tokens"]
        led.completion_tokens += usage["completion_tokens"]
        led.cost_usd_total += cost
        led.cost_usd_this_run += cost
        cut = any(c["finish_reason"] != "stop" for c in choices)
        nxt = meta["try"] + 1
        req = self.requests.get(meta["key"])
        if cut and req is not None and meta["try"] < self.cfg.length_retries and length_retry(req, nxt) is not None:
            led.retries += 1
            led.length_retries += 1
            return nxt
        self.cache.put(meta["key"], self.identity, {"choices": choices, "usage": usage, "cost_usd": cost})
        return None

