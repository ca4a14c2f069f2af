"""Part of the sandbox worker program (see :mod:`pipeline.sandbox.worker`): the zygote, the minimal
process that forks one child per job and, as their child subreaper, kills and reaps the job and
everything it left behind; and the pipes the worker drives it by. Standard library only."""

from __future__ import annotations

import os
import posix  # the guard disables os.fork, os.kill, ...; the worker itself uses posix.* directly
import resource
import select
import signal
import struct
from typing import Any, NoReturn

# Imported on the host, this part imports what it uses from the parts before it; in the sandbox all the
# parts are one program run as __main__ (see worker.py), where those names are already defined.
if __name__ != "__main__":
    from pipeline.sandbox.child import _child_main
    from pipeline.sandbox.frames import _HEADER, _read_exact

_PR_SET_CHILD_SUBREAPER = 36

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
