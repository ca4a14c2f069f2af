"""Assert-by-assert outcomes: the harness text (core) and its runs in the real sandbox."""

from __future__ import annotations

import pytest

from pipeline.core.asserts import (
    AssertOutcome,
    assert_harness,
    describe_failure,
    keep_asserts,
    observed_assert,
    parse_report,
    split_units,
)
from pipeline.sandbox import Sandbox, SandboxConfig
from pipeline.sandbox.asserts import run_asserts

PROGRAM = "def inc(x):\n    return x + 1\n"
TESTS = ("import math\nassert inc(1) == 2\nassert inc(2) == 4\nfor i in range(3):\n    assert inc(i) > i\n"
         "assert inc('a') == 1\nassert inc(3) == 4, 'message'\n")


@pytest.fixture(scope="module")
def sandbox():
    with Sandbox(SandboxConfig(timeout_s=2.0)) as sb:
        yield sb


def test_units_keep_setup_and_group_compound_statements():
    units = split_units(TESTS)
    assert [(u.index, u.is_assert) for u in units] == [(0, False), (1, True), (2, True), (3, True), (4, True), (5, True)]
    assert units[3].source == "for i in range(3):\n    assert inc(i) > i" and units[3].sides is None
    assert units[2].sides == ("inc(2)", "4")
    assert split_units("assert inc(1) == 2; assert inc(2) == 3\n") is None  # one line, two statements
    assert split_units("assert (\n") is None
    assert keep_asserts(TESTS, {1, 5}) == "import math\nassert inc(1) == 2\nassert inc(3) == 4, 'message'\n"


def test_each_assert_is_judged_alone_with_the_values_seen(sandbox):
    (run,) = run_asserts(sandbox, [(PROGRAM, TESTS)])
    assert [(o.index, o.status) for o in run.outcomes] == [
        (1, "passed"), (2, "failed"), (3, "passed"), (4, "error"), (5, "passed")]
    assert run.outcomes[1].detail == ["3", "4"]
    assert run.failures() == ["`assert inc(2) == 4` failed: `inc(2)` is 3, expected 4",
                              "`assert inc('a') == 1` raised TypeError: 'can only concatenate str (not \"int\") to str'"]
    assert not run.all_passed


def test_a_timeout_or_a_forged_report_gives_no_outcomes(sandbox):
    spin = "def inc(x):\n    while True:\n        pass\n"
    forge = PROGRAM + "print('__ASSERTS_0000__[[1, \"passed\", null]]')\nraise SystemExit(0)\n"
    timeout, forged = run_asserts(sandbox, [(spin, "assert inc(1) == 2\n"), (forge, "assert inc(1) == 5\n")])
    assert timeout.outcomes is None and timeout.verdict.status == "timeout"
    assert "did not run to the end (timeout)" in timeout.failures()[0]
    assert forged.outcomes is None and not forged.all_passed  # exited before the real report


def test_report_needs_its_own_nonce():
    harness = assert_harness("assert inc(1) == 2\n", nonce="abc")
    assert "__ASSERTS_abc__" in harness
    assert parse_report("__ASSERTS_xyz__[[0, \"passed\", null]]", "abc") is None
    assert parse_report("noise\n__ASSERTS_abc__[[0, \"passed\", null]]\n", "abc")[0].status == "passed"
    assert assert_harness("x = 1\n", nonce="abc") is None  # no assert: the caller runs the tests whole


def test_observed_assert_rewrites_only_equalities_with_values_that_read_back(sandbox):
    tests = ("assert inc(2) == 4\nassert inc(2) > 5\nassert inc(-1.5) == 9\nassert inc(x := 2) == 0, 'wrong'\n"
             "assert inc(10 ** 200) == 1\nassert inc(float('inf')) == 0\n")
    run = run_asserts(sandbox, [(PROGRAM, tests)])[0]
    units = {u.index: u for u in run.units}
    got = {o.index: observed_assert(units[o.index], o) for o in run.outcomes}
    assert got[0] == "assert inc(2) == 3"
    assert got[1] is None  # not an equality: nothing to rewrite
    assert got[2] == "assert inc(-1.5) == -0.5"
    assert got[3] == "assert inc((x := 2)) == 3"  # the message, which names the wrong value, goes
    assert got[4] is None  # the value's repr was cut at REPR_CHARS: it would not read back whole
    assert got[5] is None  # inf is no literal
    passed = next(o for o in run_asserts(sandbox, [(PROGRAM, "assert inc(1) == 2\n")])[0].outcomes)
    assert observed_assert(split_units("assert inc(1) == 2\n")[0], passed) is None
    assert keep_asserts(tests, {0, 2}, {0: got[0]}) == "assert inc(2) == 3\nassert inc(-1.5) == 9\n"


def test_a_failure_reads_the_same_on_every_run():
    """A default repr's memory address changes from run to run; the reason written to the rejects
    side file must not, or the same input gives a different file."""
    unit = split_units("assert pairs([1], [2]) == [(1, 2)]\n")[0]
    lines = {describe_failure(unit, AssertOutcome(unit.index, "failed", [f"<zip object at {addr}>", "[(1, 2)]"]))
             for addr in ("0x7f270eaaab40", "0x7f1048dc70c0")}
    assert lines == {"`assert pairs([1], [2]) == [(1, 2)]` failed: `pairs([1], [2])` is <zip object>, expected [(1, 2)]"}
    raised = describe_failure(unit, AssertOutcome(unit.index, "error", "TypeError: <object object at 0xdeadbeef1>"))
    assert raised.endswith("raised TypeError: <object object>")
