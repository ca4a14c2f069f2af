"""A fault-injecting OpenAI-compatible server for tests and benchmarks (127.0.0.1 only).

It answers `/v1/chat/completions` and `/v1/completions` with a deterministic, well-formed
exercise or textbook section derived from the request, so a run against it produces a
real dataset. Faults are deterministic too: for each distinct request body, the first
`faults_per_request` attempts may get a fault (two bodies in three, by hash; the kinds in turn)
(429 with Retry-After, 500, 503, a dropped connection, a slow answer, a hang past the
client's timeout, malformed JSON, finish_reason=length); the next attempt succeeds. So a
client that retries correctly ends with exactly the dataset of a clean run.

It is a raw asyncio HTTP/1.1 server (keep-alive, Content-Length bodies): fast enough
(thousands of requests/s) to measure the client, not itself.

    python -m pipeline.fakeserver --port 8123 --faults rate_limit,server_error --faults-per-request 1
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import threading
from collections import Counter
from dataclasses import dataclass, field

FAULTS = ("rate_limit", "server_error", "unavailable", "drop", "slow", "hang", "malformed", "length")


@dataclass
class FakeState:
    faults: tuple[str, ...] = ()
    faults_per_request: int = 1
    slow_s: float = 0.3
    hang_s: float = 5.0
    latency_s: float = 0.0
    attempts: Counter = field(default_factory=Counter)  # body hash -> attempts seen
    successes: Counter = field(default_factory=Counter)  # body hash -> 200 answers sent
    injected: Counter = field(default_factory=Counter)  # fault -> count
    requests: int = 0


def _answer_text(prompt: str, digest: str) -> str:
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
            f"assert {name}(-{k}) == 0\n```\n")


def _completion_body(req: dict, digest: str, finish_reason: str, chat: bool) -> dict:
    if chat:
        prompt = str((req.get("messages") or [{}])[-1].get("content", ""))  # the user turn decides the kind
    else:
        prompt = str(req.get("prompt", ""))
    text = _answer_text(prompt, digest)
    if finish_reason == "length":
        text = text[: len(text) // 2]
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


def _http(status: int, body: bytes, extra: str = "", content_type: str = "application/json") -> bytes:
    reason = {200: "OK", 404: "Not Found", 429: "Too Many Requests", 500: "Internal Server Error",
              503: "Service Unavailable"}.get(status, "Error")
    head = (f"HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
            f"Connection: keep-alive\r\n{extra}\r\n")
    return head.encode() + body


class FakeOpenAIServer:
    """Run in a background thread: `with FakeOpenAIServer(faults=...) as srv: srv.base_url`."""

    def __init__(self, port: int = 0, **state: object):
        self.state = FakeState(**state)
        self.port = port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._server: asyncio.base_events.Server | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()

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

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        st = self.state
        try:
            while True:
                line = await reader.readline()
                if not line:
                    return
                method, path, _ = line.decode("latin-1").split(" ", 2)
                length = 0
                while True:
                    h = await reader.readline()
                    if h in (b"\r\n", b"\n", b""):
                        break
                    k, _, v = h.decode("latin-1").partition(":")
                    if k.strip().lower() == "content-length":
                        length = int(v.strip())
                body = await reader.readexactly(length) if length else b""
                if method == "GET":
                    if path.rstrip("/") in ("/v1/models", "/health"):
                        data = json.dumps({"object": "list", "data": [{"id": "fake", "object": "model"}]}).encode()
                        writer.write(_http(200, data))
                    else:
                        writer.write(_http(404, b"{}"))
                    await writer.drain()
                    continue
                chat = path.endswith("/chat/completions")
                st.requests += 1
                req = json.loads(body)
                digest = hashlib.sha256(body).hexdigest()
                st.attempts[digest] += 1
                fault = self._fault_for(digest, st.attempts[digest])
                if fault:
                    st.injected[fault] += 1
                if st.latency_s:
                    await asyncio.sleep(st.latency_s)
                if fault == "rate_limit":
                    writer.write(_http(429, b'{"error":{"message":"rate limited","type":"rate_limit"}}',
                                       "Retry-After: 0.05\r\n"))
                elif fault in ("server_error", "unavailable"):
                    writer.write(_http(500 if fault == "server_error" else 503, b'{"error":{"message":"boom"}}'))
                elif fault == "drop":
                    writer.close()
                    return
                elif fault == "malformed":
                    writer.write(_http(200, b'{"id": "x", "choices": [ {"message": '))
                else:
                    if fault == "slow":
                        await asyncio.sleep(st.slow_s)
                    elif fault == "hang":
                        await asyncio.sleep(st.hang_s)
                    finish = "length" if fault == "length" else "stop"
                    if finish == "stop":
                        st.successes[digest] += 1
                    writer.write(_http(200, json.dumps(_completion_body(req, digest, finish, chat)).encode()))
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, ValueError, asyncio.CancelledError):
            return
        finally:
            if not writer.is_closing():
                writer.close()

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port, backlog=1024)
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        await self._stop.wait()
        self._server.close()
        # Cancel the connection handlers and let them finish before the loop closes.
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._server.wait_closed()

    def start(self) -> FakeOpenAIServer:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_until_complete, args=(self._main(),), daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("fake server did not start")
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
