"""Assert-by-assert test outcomes: which of an exercise's asserts fail, and with what values.

An exercise's tests are a list of top-level statements. Each statement that contains an
``assert`` is a *unit*; the others (imports, helper variables) are *setup* and run in order.
:func:`assert_harness` turns the tests into a program that runs every unit in its own
``try`` and prints one report line (marked with a per-program nonce, so a program that prints
look-alike text cannot forge it); :func:`parse_report` reads it back from the sandbox's output.
A failing ``assert a == b`` reports the values of both sides, which is what the generate
stage's repair round shows the teacher and what the filter stage's assert policy keeps as
evidence.

    python -c "from pipeline.core.asserts import assert_harness; \
print(assert_harness('x = 2\\nassert f(x) == 4\\nassert f(0) == 1\\n', nonce='n'))"

Only the text is built here; the program runs in :mod:`pipeline.sandbox`.
"""

from __future__ import annotations

import ast
import json
import re
import textwrap
from dataclasses import dataclass

REPR_CHARS = 160  # how much of a value's repr a report keeps (the sandbox returns 4 KiB of output)


@dataclass(frozen=True)
class Unit:
    """One top-level statement of the tests; ``is_assert`` when it contains an assert."""

    index: int  # position among the tests' top-level statements
    source: str  # its exact lines in the tests
    is_assert: bool
    sides: tuple[str, str] | None  # for `assert a <op> b`: the sources of a and b


def split_units(tests: str) -> list[Unit] | None:
    """The tests' top-level statements, or None if they do not parse."""
    try:
        tree = ast.parse(tests)
    except SyntaxError:
        return None
    lines = tests.splitlines()
    units = []
    for i, node in enumerate(tree.body):
        src = "\n".join(lines[node.lineno - 1 : node.end_lineno])
        has_assert = any(isinstance(n, ast.Assert) for n in ast.walk(node))
        sides = None
        if isinstance(node, ast.Assert) and isinstance(node.test, ast.Compare) and len(node.test.comparators) == 1:
            sides = (ast.unparse(node.test.left), ast.unparse(node.test.comparators[0]))
        # A statement sharing a line with another (`a = 1; assert f(a)`) cannot be cut out alone.
        shared = any(other is not node and other.lineno <= node.end_lineno and other.end_lineno >= node.lineno
                     for other in tree.body)
        if shared:
            return None
        units.append(Unit(i, src, has_assert, sides))
    return units


def assert_units(tests: str) -> list[Unit]:
    return [u for u in split_units(tests) or [] if u.is_assert]


def assert_harness(tests: str, nonce: str) -> str | None:
    """A program that runs each assert unit on its own and prints ``__ASSERTS_<nonce>__[...]``:
    one ``[index, "passed" | "failed" | "error", detail]`` per unit. None if the tests do not
    split into units (the caller falls back to running them whole)."""
    units = split_units(tests)
    if not units or not any(u.is_assert for u in units):
        return None
    out = [
        "import json as __j",
        "__r = []",
        "def __rep(v):",
        "    try:",
        "        s = repr(v)",
        "    except BaseException:",
        "        s = '<repr failed>'",
        f"    return s if len(s) <= {REPR_CHARS} else s[:{REPR_CHARS}] + '...'",
    ]
    for u in units:
        if not u.is_assert:
            out.append(u.source)
            continue
        body = textwrap.indent(ast.unparse(ast.parse(u.source)), "    ")
        values = f"[__rep({u.sides[0]}), __rep({u.sides[1]})]" if u.sides else "None"
        out += [
            "try:", body, f"    __r.append([{u.index}, 'passed', None])",
            "except AssertionError:",
            "    try:", f"        __v = {values}", "    except BaseException:", "        __v = None",
            f"    __r.append([{u.index}, 'failed', __v])",
            "except Exception as __e:",
            f"    __r.append([{u.index}, 'error', type(__e).__name__ + ': ' + __rep(str(__e))])",
        ]
    out.append(f"print('\\n__ASSERTS_{nonce}__' + __j.dumps(__r))")
    return "\n".join(out) + "\n"


@dataclass(frozen=True)
class AssertOutcome:
    index: int
    status: str  # passed | failed | error
    detail: list | str | None  # failed: [left repr, right repr] or None; error: "Type: message"


def parse_report(output: str, nonce: str) -> list[AssertOutcome] | None:
    """The outcomes printed by :func:`assert_harness`'s program, or None if its report is missing."""
    marker = f"__ASSERTS_{nonce}__"
    line = next((ln for ln in reversed(output.splitlines()) if ln.startswith(marker)), None)
    if line is None:
        return None
    try:
        rows = json.loads(line[len(marker):])
        return [AssertOutcome(int(i), str(s), d) for i, s, d in rows]
    except (ValueError, TypeError):
        return None


# A default repr names a memory address (`<zip object at 0x7f27...>`) that differs from run to run.
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def describe_failure(unit: Unit, outcome: AssertOutcome) -> str:
    """One line for a person (or the teacher) about a failed unit; the same line on every run (memory
    addresses in reprs are dropped), so the rejects side file is reproducible."""
    first = " ".join(unit.source.split())
    first = first if len(first) <= 200 else first[:200] + "..."
    if outcome.status == "error":
        return f"`{first}` raised {_ADDRESS.sub('', str(outcome.detail))}"
    if unit.sides and isinstance(outcome.detail, list) and len(outcome.detail) == 2:
        left, right = (_ADDRESS.sub("", str(side)) for side in outcome.detail)
        return f"`{first}` failed: `{unit.sides[0]}` is {left}, expected {right}"
    return f"`{first}` failed"


def keep_asserts(tests: str, keep: set[int], replace: dict[int, str] | None = None) -> str:
    """The tests with only the assert units in ``keep`` (setup statements all stay, in order); a unit
    in ``replace`` is written as its replacement source."""
    units = split_units(tests) or []
    replace = replace or {}
    return "\n".join(replace.get(u.index, u.source) for u in units if not u.is_assert or u.index in keep) + "\n"


def observed_assert(unit: Unit, outcome: AssertOutcome) -> str | None:
    """``assert <call> == <the value the solution returned>`` for a failed ``assert <call> == <expected>``,
    or None when the unit is not such an equality or the value seen is not a Python literal that
    reads back whole (a truncated, custom or non-finite repr)."""
    if outcome.status != "failed" or not unit.sides or not isinstance(outcome.detail, list):
        return None
    node = ast.parse(unit.source).body[0]
    if not (isinstance(node, ast.Assert) and isinstance(node.test.ops[0], ast.Eq)):
        return None
    seen = outcome.detail[0]
    if not isinstance(seen, str) or len(seen) >= REPR_CHARS:
        return None  # may have been cut at REPR_CHARS
    try:
        ast.literal_eval(seen)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return None
    return f"assert {unit.sides[0]} == {seen}"
