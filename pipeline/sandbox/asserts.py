"""Run a program against its tests assert by assert, in the sandbox: which asserts fail, and how.

    python -c "from pipeline.sandbox import Sandbox; from pipeline.sandbox.asserts import run_asserts; \
print(run_asserts(Sandbox().__enter__(), [('def f(x):\\n    return x + 1\\n', 'assert f(1) == 2\\nassert f(2) == 4\\n')]))"

Used by the generate stage's repair round (the failures it shows the teacher) and by the filter
stage's assert policy (which asserts may be dropped). The harness text comes from
:mod:`pipeline.core.asserts`; tests that do not split into units run whole, as one unit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pipeline.core.asserts import (
    AssertOutcome,
    Unit,
    assert_harness,
    describe_failure,
    parse_report,
    split_units,
)
from pipeline.core.records import sha256_text
from pipeline.sandbox.engine import Job, Sandbox, Verdict


@dataclass(frozen=True)
class AssertRun:
    """The outcome of one program against its tests. ``outcomes`` is None when the asserts could not be
    told apart (the tests do not split, or the program did not run to the report: a timeout, a crash in
    setup code); ``verdict`` is the sandbox's verdict of the whole run."""

    verdict: Verdict
    units: list[Unit]
    outcomes: list[AssertOutcome] | None

    @property
    def all_passed(self) -> bool:
        if self.outcomes is None:
            return False
        return bool(self.outcomes) and all(o.status == "passed" for o in self.outcomes)

    def failures(self) -> list[str]:
        """What went wrong, one line each, as the teacher or a person should read it."""
        if self.outcomes is None:
            v = self.verdict
            what = f"{v.error_type}: {(v.error_message or '')[:300]}" if v.error_type else v.status
            at = f" at `{v.failed_source.strip()[:200]}`" if v.failed_source else ""
            return [f"the tests did not run to the end ({v.status}): {what}{at}"]
        by_index = {u.index: u for u in self.units}
        return [describe_failure(by_index[o.index], o) for o in self.outcomes if o.status != "passed"]


def run_asserts(sandbox: Sandbox, items: Sequence[tuple[str, str]], job_ids: Sequence[str] | None = None
                ) -> list[AssertRun]:
    """One :class:`AssertRun` per ``(program, tests)``, in order; the jobs run in one sandbox batch."""
    jobs, plans = [], []
    for i, (program, tests) in enumerate(items):
        nonce = sha256_text(program + "\0" + tests)[:16]
        harness = assert_harness(tests, nonce)
        jid = job_ids[i] if job_ids else str(i)
        jobs.append(Job(program, test=harness if harness is not None else tests, job_id=jid))
        plans.append((nonce, harness is not None, split_units(tests) or []))
    runs = []
    for verdict, (nonce, split, units) in zip(sandbox.run(jobs), plans, strict=True):
        outcomes = parse_report(verdict.output, nonce) if split and verdict.passed else None
        if not split and verdict.passed:  # run whole: one unit, passed
            outcomes = [AssertOutcome(0, "passed", None)]
            units = [Unit(0, "", True, None)]
        runs.append(AssertRun(verdict, units, outcomes))
    return runs
