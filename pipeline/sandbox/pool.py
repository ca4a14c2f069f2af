"""The host side of the pool: one `_Slot` per sandboxed worker, the host thread that feeds it jobs
(keeping the next one queued in its pipe), collects their verdicts, and replaces a worker that dies
or hangs."""

from __future__ import annotations

import collections
import logging
import queue
import time
from dataclasses import dataclass

from pipeline.core.config import SandboxConfig
from pipeline.sandbox.jobs import _VERDICT_FIELDS, Job, Verdict, _encode, _error
from pipeline.sandbox.launch import Isolation, _Worker

logger = logging.getLogger(__name__)

_GRACE_S = 10.0  # host-side slack over a job's timeout before a worker counts as hung
_Done = queue.SimpleQueue[tuple[int, Verdict]]
_Task = tuple[int, Job, _Done]
_PIPELINE_DEPTH = 2  # jobs handed to a worker at once: the next one waits in its pipe
_PIPELINE_MAX_FRAME = 16 << 10  # larger frames are sent only to an idle worker (pipe buffers are 64 KiB)


@dataclass
class _Pending:
    index: int
    job: Job
    done: _Done
    frame: bytes | Verdict  # a Verdict: the job cannot run
    since: float = 0.0  # when the worker started on it, as far as the host can tell
    attempts: int = 0
    finished: bool = False

    def finish(self, verdict: Verdict) -> None:
        if not self.finished:
            self.finished = True
            self.done.put((self.index, verdict))


class _Slot:
    """One sandboxed worker and the host thread that feeds it.

    Keeps up to ``_PIPELINE_DEPTH`` jobs in the worker's pipe so it never waits for the host
    between jobs. If the worker dies or hangs, the job it was running gets an ``error`` verdict,
    the worker is replaced and the jobs queued behind it are sent again.
    """

    def __init__(
        self, config: SandboxConfig, isolation: Isolation, slot: int, tasks: queue.SimpleQueue[_Task | None]
    ) -> None:
        self.config, self.isolation, self.slot, self.tasks = config, isolation, slot, tasks
        self.worker: _Worker | None = None
        self.inflight: collections.deque[_Pending] = collections.deque()
        self.retry: collections.deque[_Pending] = collections.deque()
        self.current: _Pending | None = None  # taken from the queue, not yet in flight
        self.closing = False

    def serve(self, started: queue.SimpleQueue[BaseException | None]) -> None:
        # The worker is spawned by this thread, which lives as long as the pool: bwrap's
        # --die-with-parent fires when the *thread* that forked it exits.
        try:
            self.worker = _Worker(self.config, self.isolation, self.slot)
        except BaseException as exc:
            started.put(exc)
            return
        started.put(None)
        while not (self.closing and not self.inflight and not self.retry):
            try:
                self._step()
            except Exception as exc:  # a bug here must cost verdicts, never hang Sandbox.run
                logger.exception("sandbox slot %d failed; restarting its worker", self.slot)
                for item in [*self.inflight, *self.retry, *([self.current] if self.current else [])]:
                    item.finish(_error(item.job, "SandboxError", repr(exc)))
                self.inflight.clear()
                self.retry.clear()
                self._drop_worker()
        if self.worker is not None:
            self.worker.close()

    def _step(self) -> None:
        self.current = item = self._next()
        if item is not None:
            self._send(item)
        self.current = None
        if self.inflight and (item is None or len(self.inflight) >= _PIPELINE_DEPTH):
            self._receive()

    def _next(self) -> _Pending | None:
        """A job to send: a retried one, a new one (waiting only when idle), or None."""
        if self.retry:
            return self.retry.popleft()
        if self.closing:
            return None
        try:
            task = self.tasks.get() if not self.inflight else self.tasks.get_nowait()
        except queue.Empty:
            return None
        if task is None:  # the pool is closing: finish what is in flight, then stop
            self.closing = True
            return None
        index, job, done = task
        return _Pending(index, job, done, _encode(job, self.config.max_program_bytes))

    def _send(self, item: _Pending) -> None:
        if isinstance(item.frame, Verdict):
            item.finish(item.frame)
            return
        if len(item.frame) > _PIPELINE_MAX_FRAME:
            while self.inflight:
                self._receive()
        try:
            if self.worker is None:
                self.worker = _Worker(self.config, self.isolation, self.slot)
            self.worker.send(item.frame)
        except (OSError, RuntimeError) as exc:
            if self.inflight:  # it died running the job ahead of this one
                self.retry.append(item)
                self._lost(exc)
            elif item.attempts == 0:  # it died idle (or would not start): once more, afresh
                item.attempts += 1
                self._drop_worker()
                self.retry.appendleft(item)
            else:
                item.finish(_error(item.job, "WorkerLost", f"no sandbox worker could take this job: {exc}"))
            return
        if not self.inflight:
            item.since = time.monotonic()
        self.inflight.append(item)

    def _receive(self) -> None:
        head = self.inflight[0]
        timeout = head.job.timeout_s or self.config.timeout_s
        assert self.worker is not None
        try:
            answer = self.worker.receive(head.since + timeout + _GRACE_S)
        except (EOFError, TimeoutError, OSError, ValueError) as exc:
            self._lost(exc)
            return
        self.inflight.popleft()
        head.finish(
            Verdict(**{k: v for k, v in answer.items() if k in _VERDICT_FIELDS}, job_id=head.job.job_id)
        )
        if self.inflight:
            self.inflight[0].since = time.monotonic()

    def _lost(self, exc: BaseException) -> None:
        """The worker died or hung with the head job running: blame that job, resend the rest."""
        head = self.inflight.popleft()
        logger.warning(
            "sandbox worker %d lost during job %r: %s; restarting it", self.slot, head.job.job_id, exc
        )
        head.finish(
            _error(head.job, "WorkerLost", f"the sandbox worker died or hung during this job: {exc!r}")
        )
        self.retry.extendleft(reversed(self.inflight))
        self.inflight.clear()
        self._drop_worker()

    def _drop_worker(self) -> None:
        if self.worker is not None:
            self.worker.proc.kill()
            self.worker.close()
        self.worker = None
