"""A fault-injecting OpenAI-compatible server for tests and benchmarks (127.0.0.1 only).

It answers `POST /v1/chat/completions` and `POST /v1/completions` with a deterministic,
well-formed exercise or textbook section derived from the request, so a run against it
produces a real dataset; `GET /v1/models` and `GET /health` list the one model, `fake`.
Faults are deterministic too: for each distinct request body, the first `faults_per_request`
attempts may get a fault (two bodies in three, by hash; the kinds in turn); the next attempt
succeeds. So a client that retries correctly ends with exactly the dataset of a clean run.
What the client sees for each kind:

    rate_limit    429 with `Retry-After: 0.05` and an OpenAI-style error body
    server_error  500 with an error body
    unavailable   503 with an error body
    drop          the connection is closed once the request is read, with no response
    slow          the normal answer, `slow_s` late
    hang          the normal answer, `hang_s` late (past the client's timeout in the tests)
    malformed     200 whose JSON body is cut off mid-object
    length        200 with `finish_reason: "length"` and half the text
    loop          200 with `finish_reason: "length"`: an exercise whose tests block never closes, its
                  last assert repeated until the cap (a greedy teacher's loop); a textbook cut in half

A request body that is not a JSON object gets the connection closed, with no response.
The answer to a request follows its JSON body with sorted keys (not its bytes), so the same
request sent alone or in a batch file gets the same answer.

Errors no retry can fix: with `api_key` set, a request without `Authorization: Bearer <key>`
gets 401 (the message quotes the key it got, masked as OpenAI does); `status` answers every
completion with that status and `status_message` (e.g. 404 for an unknown model).
`fail_first_bodies` = N: the first N distinct request bodies get 500 on every attempt
(their digests in `failing`; clear it and they are answered).

The OpenAI Batch API, with the same answers: `POST /v1/files` (multipart, purpose=batch),
`GET /v1/files/{id}/content`, `POST /v1/batches`, `GET /v1/batches/{id}`, `GET /v1/batches`
(newest first, `limit`/`after`), `POST /v1/batches/{id}/cancel`. A batch ends on its
`batch_polls_to_finish`-th retrieve (0 = it stays in progress: a run can be killed while
it waits; set it back to let the batch end). Faults:

    batch_expire        the first N batches created expire: about half their items answered,
                        the others in the error file as `batch_expired` (response null)
    batch_item_failures each request body fails (500 in the error file) the first N times it is
                        in a batch; the next time it is answered
    batch_status        every item answered with this HTTP status in the error file (e.g. 400)
    batch_refuse        a batch fails validation as a whole (status `failed`, errors listed)
    batch_cut_first     the first N items of the first batch are cut at max_tokens (finish_reason length)

`uploads` (files the client sent), `batches_created`, `batch_items` and `batch_polls` count what the
service saw.

It is an `aiohttp.web` application run by an `AppRunner` + `TCPSite` on its own event loop
in a background thread (HTTP/1.1 keep-alive, no access log): fast enough (well over a
thousand requests/s on one core) to measure the client, not itself.

    python -m tests.fakeserver --port 8123 --faults rate_limit,server_error --faults-per-request 1
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

from aiohttp import web

FAULTS = ("rate_limit", "server_error", "unavailable", "drop", "slow", "hang", "malformed", "length", "loop")
# Faults a retry of the same request cures. A cut answer ("length", "loop") is not one of them: the
# client asks for another sample (another seed), so the run cannot end with the clean server's answer.
TRANSIENT_FAULTS = tuple(f for f in FAULTS if f not in ("length", "loop"))


@dataclass
class FakeState:
    faults: tuple[str, ...] = ()
    faults_per_request: int = 1
    slow_s: float = 0.3
    hang_s: float = 5.0
    latency_s: float = 0.0
    # Exercises with wrong asserts: half of the first answers (by prompt hash) carry this many
    # asserts whose expected value is off by one; a repair turn (a second user message) answers
    # the same function with correct asserts only. The function follows the first user message.
    wrong_asserts: int = 0
    # Fixed answers: the text of the first key found in the prompt (or the last user turn).
    answers: dict[str, str] = field(default_factory=dict)
    attempts: Counter = field(default_factory=Counter)  # body hash -> attempts seen
    successes: Counter = field(default_factory=Counter)  # body hash -> 200 answers sent
    injected: Counter = field(default_factory=Counter)  # fault -> count
    requests: int = 0
    # Errors no retry can fix, and bodies that always fail.
    api_key: str | None = None
    status: int = 0
    status_message: str = "The model `fake-model` does not exist or you do not have access to it."
    fail_first_bodies: int = 0
    failing: set = field(default_factory=set)  # canonical digests answered 500, every attempt
    # The Batch API.
    batch_polls_to_finish: int = 1
    batch_expire: int = 0
    batch_item_failures: int = 0
    batch_status: int = 0
    batch_refuse: bool = False
    batch_cut_first: int = 0
    files: dict = field(default_factory=dict)  # file id -> bytes
    batches: dict = field(default_factory=dict)  # batch id -> batch object (dict), in creation order
    uploads: int = 0
    batches_created: int = 0
    batch_items: int = 0  # request lines submitted in batches
    batch_polls: Counter = field(default_factory=Counter)  # batch id -> retrieves
    batch_attempts: Counter = field(default_factory=Counter)  # canonical digest -> times seen in a batch
    successes_canonical: set = field(default_factory=set)  # canonical digests answered 200 (online)


def canonical_digest(req: dict) -> str:
    """What decides the answer: the request's JSON with sorted keys, however it was serialized or sent."""
    return hashlib.sha256(json.dumps(req, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _answer_text(prompt: str, digest: str, wrong: int = 0) -> str:
    """A well-formed answer: an exercise (two code blocks) or a textbook section."""
    name = f"f_{digest[:10]}"
    k = int(digest[10:14], 16) % 50 + 1
    if "textbook" in prompt.lower():
        return (f"# Section {digest[:6]}\n\nThis section explains a small idea with care, shows code, and then "
                f"walks through what the code does and why it works, step by step, for the reader.\n\n"
                f"```python\nvalues = [i * {k} for i in range(3)]\nprint(values)\n```\n\n"
                f"The list comprehension multiplies each index by {k}.\n")
    return (f"```python\ndef {name}(x: int) -> int:\n    \"\"\"Return x plus {k}.\n\n    >>> {name}(1)\n    {k + 1}\n"
            f"    \"\"\"\n    return x + {k}\n```\n\n```python\nassert {name}(0) == {k}\nassert {name}(1) == {k + 1}\n"
            f"assert {name}(-{k}) == 0\n" + "".join(f"assert {name}({10 + i}) == {11 + i + k}\n" for i in range(wrong))
            + "```\n")


def _completion_body(req: dict, digest: str, finish_reason: str, chat: bool, wrong_asserts: int = 0,
                     answers: dict[str, str] | None = None) -> dict:
    wrong = 0
    if chat:
        prompt = str((req.get("messages") or [{}])[-1].get("content", ""))  # the user turn decides the kind
        users = [str(m.get("content", "")) for m in req.get("messages") or [] if m.get("role") == "user"]
        if wrong_asserts and users and "textbook" not in users[0].lower():
            digest = hashlib.sha256(users[0].encode()).hexdigest()
            wrong = wrong_asserts if len(users) == 1 and int(digest[14:16], 16) % 2 == 0 else 0
    else:
        prompt = str(req.get("prompt", ""))
    text = next((a for k, a in (answers or {}).items() if k in prompt), None) or _answer_text(prompt, digest, wrong)
    if finish_reason == "loop" and text.endswith("```\n"):
        last = text[:-4].splitlines()[-1]
        text = text[:-4] + (last + "\n") * 6 + last[: len(last) // 2]
    elif finish_reason in ("length", "loop"):
        text = text[: len(text) // 2]
    finish_reason = "length" if finish_reason == "loop" else finish_reason
    n = int(req.get("n") or 1)
    if chat:
        choices = [{"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason}
                   for i in range(n)]
    else:
        choices = [{"index": i, "text": text, "finish_reason": finish_reason, "logprobs": None} for i in range(n)]
    usage = {"prompt_tokens": len(prompt) // 4, "completion_tokens": len(text) // 4 * n}
    usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
    return {"id": f"cmpl-{digest[:12]}", "object": "chat.completion" if chat else "text_completion",
            "created": 0, "model": req.get("model", "fake"), "choices": choices, "usage": usage}


_JSON = "application/json"
_MODELS = json.dumps({"object": "list", "data": [{"id": "fake", "object": "model"}]}).encode()
_RATE_LIMITED = b'{"error":{"message":"rate limited","type":"rate_limit"}}'
_BOOM = b'{"error":{"message":"boom"}}'
_TRUNCATED = b'{"id": "x", "choices": [ {"message": '


def _json(body: bytes, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, body=body, content_type=_JSON, headers=headers)


def _drop(request: web.Request) -> web.Response:
    """Close the connection with nothing written: the client sees it end mid-request."""
    if request.transport is not None:
        request.transport.close()
    # Never sent: writing it to the closed transport fails, and aiohttp ends the connection.
    return web.Response()


class FakeOpenAIServer:
    """Run in a background thread: `with FakeOpenAIServer(faults=...) as srv: srv.base_url`."""

    def __init__(self, port: int = 0, **state: object):
        self.state = FakeState(**state)
        self.port = port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def _fault_for(self, digest: str, attempt: int) -> str | None:
        st = self.state
        if not st.faults or attempt > st.faults_per_request:
            return None
        # A third of request bodies (by hash) get no fault at all; the others take the fault
        # kinds in turn, so every kind is injected once there are as many faults as kinds.
        if int(digest[-8:], 16) % 3 == 0:
            return None
        return st.faults[sum(st.injected.values()) % len(st.faults)]

    def _app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/health", self._models)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/completions", self._text)
        app.router.add_post("/v1/files", self._file_upload)
        app.router.add_get("/v1/files/{file_id}/content", self._file_content)
        app.router.add_post("/v1/batches", self._batch_create)
        app.router.add_get("/v1/batches", self._batch_list)
        app.router.add_get("/v1/batches/{batch_id}", self._batch_retrieve)
        app.router.add_post("/v1/batches/{batch_id}/cancel", self._batch_cancel)
        # Anything else, as the hand-written server did: a GET of another path is a 404, any
        # other method a text completion (a chat one if the path ends in /chat/completions).
        app.router.add_route("*", "/{tail:.*}", self._other)
        return app

    async def _models(self, request: web.Request) -> web.Response:
        return _json(_MODELS)

    async def _chat(self, request: web.Request) -> web.Response:
        return await self._complete(request, chat=True)

    async def _text(self, request: web.Request) -> web.Response:
        return await self._complete(request, chat=False)

    async def _other(self, request: web.Request) -> web.Response:
        if request.method == "GET":
            if request.path.rstrip("/") in ("/v1/models", "/health"):
                return _json(_MODELS)
            return _json(b"{}", 404)
        return await self._complete(request, chat=request.path.endswith("/chat/completions"))

    def _refused(self, request: web.Request) -> web.Response | None:
        """401 for a missing or wrong key (when the server wants one), else None."""
        key = self.state.api_key
        if key is None:
            return None
        got = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        if got == key:
            return None
        masked = f"{got[:3]}{'*' * max(0, len(got) - 7)}{got[-4:]}" if len(got) > 8 else "***"
        return _json(json.dumps({"error": {"message": f"Incorrect API key provided: {masked}. You can find your "
                                           "API key at https://platform.openai.com/account/api-keys.",
                                           "type": "invalid_request_error", "code": "invalid_api_key"}}).encode(), 401)

    async def _complete(self, request: web.Request, chat: bool) -> web.Response:
        st = self.state
        body = await request.read()
        st.requests += 1
        refused = self._refused(request)
        if refused is not None:
            return refused
        try:
            req = json.loads(body)
        except ValueError:
            req = None
        if not isinstance(req, dict):
            return _drop(request)
        if st.status:
            return _json(json.dumps({"error": {"message": st.status_message, "type": "invalid_request_error"}}).encode(),
                         st.status)
        digest = hashlib.sha256(body).hexdigest()
        answer_digest = canonical_digest(req)
        if len(st.failing) < st.fail_first_bodies and answer_digest not in st.failing and \
                answer_digest not in st.successes_canonical:
            st.failing.add(answer_digest)
        if answer_digest in st.failing:
            st.attempts[digest] += 1
            return _json(_BOOM, 500)
        st.attempts[digest] += 1
        fault = self._fault_for(digest, st.attempts[digest])
        if fault:
            st.injected[fault] += 1
        if st.latency_s:
            await asyncio.sleep(st.latency_s)
        if fault == "rate_limit":
            return _json(_RATE_LIMITED, 429, {"Retry-After": "0.05"})
        if fault in ("server_error", "unavailable"):
            return _json(_BOOM, 500 if fault == "server_error" else 503)
        if fault == "drop":
            return _drop(request)
        if fault == "malformed":
            return _json(_TRUNCATED)
        if fault == "slow":
            await asyncio.sleep(st.slow_s)
        elif fault == "hang":
            # Not cancelled when the client gives up (aiohttp's default): the answer is
            # counted, then written to the closed connection and dropped, as before.
            await asyncio.sleep(st.hang_s)
        finish = fault if fault in ("length", "loop") else "stop"
        if finish == "stop":
            st.successes[digest] += 1
            st.successes_canonical.add(answer_digest)
        return _json(json.dumps(_completion_body(req, answer_digest, finish, chat, st.wrong_asserts,
                                                 st.answers)).encode())

    # -- the Batch API ------------------------------------------------------------------------

    async def _file_upload(self, request: web.Request) -> web.Response:
        st = self.state
        if (refused := self._refused(request)) is not None:
            return refused
        form = await request.post()
        upload = form.get("file")
        if upload is None or form.get("purpose") != "batch":
            return _json(b'{"error":{"message":"file and purpose=batch are required"}}', 400)
        data = upload.file.read()
        st.uploads += 1
        fid = f"file-{len(st.files) + 1:04d}"
        st.files[fid] = data
        return _json(json.dumps({"id": fid, "object": "file", "bytes": len(data), "created_at": int(time.time()),
                                 "filename": upload.filename, "purpose": "batch", "status": "processed"}).encode())

    async def _file_content(self, request: web.Request) -> web.Response:
        if (refused := self._refused(request)) is not None:
            return refused
        data = self.state.files.get(request.match_info["file_id"])
        if data is None:
            return _json(b'{"error":{"message":"No such file"}}', 404)
        return web.Response(body=data, content_type="application/octet-stream")

    async def _batch_create(self, request: web.Request) -> web.Response:
        st = self.state
        if (refused := self._refused(request)) is not None:
            return refused
        req = await request.json()
        data = st.files.get(req.get("input_file_id"))
        if data is None:
            return _json(b'{"error":{"message":"input_file_id not found"}}', 400)
        st.batches_created += 1
        bid = f"batch_{st.batches_created:04d}"
        n = sum(1 for line in data.splitlines() if line.strip())
        st.batch_items += n
        st.batches[bid] = {
            "id": bid, "object": "batch", "endpoint": req.get("endpoint"), "input_file_id": req["input_file_id"],
            "completion_window": req.get("completion_window", "24h"), "status": "validating",
            "created_at": int(time.time()), "metadata": req.get("metadata"), "output_file_id": None,
            "error_file_id": None, "errors": None, "request_counts": {"total": n, "completed": 0, "failed": 0},
            "_expire": st.batches_created <= st.batch_expire}
        return _json(json.dumps(self._public(st.batches[bid])).encode())

    @staticmethod
    def _public(batch: dict) -> dict:
        return {k: v for k, v in batch.items() if not k.startswith("_")}

    async def _batch_retrieve(self, request: web.Request) -> web.Response:
        st = self.state
        if (refused := self._refused(request)) is not None:
            return refused
        batch = st.batches.get(request.match_info["batch_id"])
        if batch is None:
            return _json(b'{"error":{"message":"No such batch"}}', 404)
        st.batch_polls[batch["id"]] += 1
        if batch["status"] in ("validating", "in_progress"):
            batch["status"] = "in_progress"
            if st.batch_polls_to_finish and st.batch_polls[batch["id"]] >= st.batch_polls_to_finish:
                self._finish(batch)
        return _json(json.dumps(self._public(batch)).encode())

    async def _batch_list(self, request: web.Request) -> web.Response:
        if (refused := self._refused(request)) is not None:
            return refused
        limit = int(request.query.get("limit", 20))
        ordered = list(reversed(self.state.batches.values()))  # newest first
        after = request.query.get("after")
        if after:
            ids = [b["id"] for b in ordered]
            ordered = ordered[ids.index(after) + 1:] if after in ids else []
        page = [self._public(b) for b in ordered[:limit]]
        return _json(json.dumps({"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
                                 "last_id": page[-1]["id"] if page else None,
                                 "has_more": len(ordered) > limit}).encode())

    async def _batch_cancel(self, request: web.Request) -> web.Response:
        batch = self.state.batches.get(request.match_info["batch_id"])
        if batch is None:
            return _json(b'{"error":{"message":"No such batch"}}', 404)
        batch["status"] = "cancelled"
        return _json(json.dumps(self._public(batch)).encode())

    def _finish(self, batch: dict) -> None:
        """Answer every line of the batch's input file (or expire, fail, refuse it) and write its output files."""
        st = self.state
        if st.batch_refuse:
            batch.update(status="failed", errors={"object": "list", "data": [
                {"code": "invalid_request", "message": "The model `fake-model` does not exist", "line": 1}]})
            return
        out, err = [], []
        for i, line in enumerate(st.files[batch["input_file_id"]].splitlines()):
            if not line.strip():
                continue
            item = json.loads(line)
            body, cid = item["body"], item["custom_id"]
            digest = canonical_digest(body)
            st.batch_attempts[digest] += 1
            rid = f"batch_req_{batch['id']}_{i}"
            if batch["_expire"] and int(digest[-2:], 16) % 2:
                err.append({"id": rid, "custom_id": cid, "response": None, "error": {
                    "code": "batch_expired",
                    "message": "This request could not be executed before the completion window expired."}})
            elif st.batch_status or st.batch_attempts[digest] <= st.batch_item_failures:
                status = st.batch_status or 500
                err.append({"id": rid, "custom_id": cid, "error": None, "response": {
                    "status_code": status, "request_id": rid,
                    "body": {"error": {"message": st.status_message if st.batch_status else "boom",
                                       "type": "invalid_request_error" if st.batch_status else "server_error"}}}})
            else:
                chat = item["url"].endswith("/chat/completions")
                cut = batch["id"] == "batch_0001" and i < st.batch_cut_first
                answer = _completion_body(body, digest, "length" if cut else "stop", chat, st.wrong_asserts, st.answers)
                out.append({"id": rid, "custom_id": cid, "error": None,
                            "response": {"status_code": 200, "request_id": rid, "body": answer}})
        for kind, rows in (("output_file_id", out), ("error_file_id", err)):
            if rows:
                fid = f"file-{len(st.files) + 1:04d}"
                st.files[fid] = "".join(json.dumps(r) + "\n" for r in rows).encode()
                batch[kind] = fid
        batch["request_counts"] = {"total": len(out) + len(err), "completed": len(out), "failed": len(err)}
        batch["status"] = "expired" if batch["_expire"] else "completed"

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        # A hung handler is cancelled almost at once on stop, not waited for.
        runner = web.AppRunner(self._app(), access_log=None, shutdown_timeout=0.01)
        try:
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", self.port, backlog=1024)
            await site.start()
            self.port = runner.addresses[0][1]
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            await runner.cleanup()
            return
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            await runner.cleanup()
            # Cancel anything left (a handler still sleeping) and let it finish before the loop closes.
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def start(self) -> FakeOpenAIServer:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_until_complete, args=(self._main(),), daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("fake server did not start")
        if self._error is not None:
            self._thread.join(10)
            self._loop.close()
            raise RuntimeError(f"fake server did not start: {self._error}") from self._error
        return self

    def stop(self) -> None:
        if self._thread and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(10)
        if self._loop and not self._loop.is_running():
            self._loop.close()

    def __enter__(self) -> FakeOpenAIServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, default=8123)
    p.add_argument("--faults", default="", help=f"Comma-separated, from: {', '.join(FAULTS)}")
    p.add_argument("--faults-per-request", type=int, default=1)
    args = p.parse_args(argv)
    faults = tuple(f for f in args.faults.split(",") if f)
    srv = FakeOpenAIServer(port=args.port, faults=faults, faults_per_request=args.faults_per_request)
    srv.start()
    print(srv.base_url, flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        srv.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
