"""Starting one sandboxed worker: its environment, the bubblewrap command line (what is hidden, what
is bound back, which capabilities stay), the probe of whether bwrap works here, the worker program's
source, and the host side of a worker process (`_Worker`)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import site
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import pipeline.sandbox.worker as worker_mod
from pipeline.core.config import SandboxConfig
from pipeline.sandbox.frames import read_frame, write_all

logger = logging.getLogger(__name__)

Isolation = Literal["bwrap", "rlimits"]

PROJECT_ROOT = Path(__file__).resolve().parents[2]
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
_FUTURE = "from __future__ import annotations\n"


def worker_program() -> str:
    """The source the worker runs (``python -S -c``): its parts (``worker.PARTS``) joined in order into
    one program that imports nothing of the project. A future import must open a program, so each
    part's own moves to the top; a part without exactly one stops the start (no worker, no job run)."""
    folder = Path(worker_mod.__file__).parent
    texts = []
    for name in worker_mod.PARTS:
        text = (folder / f"{name}.py").read_text()
        if text.count(_FUTURE) != 1:
            raise RuntimeError(f"sandbox worker part {name}.py must have exactly one line {_FUTURE.strip()!r}")
        texts.append(text.replace(_FUTURE, "", 1))
    return _FUTURE + "\n".join(texts)


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
            worker_program(),
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
        write_all(self.proc.stdin.fileno(), frame)

    def receive(self, deadline: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        return read_frame(self.proc.stdout.fileno(), deadline)

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
