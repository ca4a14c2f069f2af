"""The functional signal: an exercise whose function passes a HumanEval problem's own tests *is* that problem.

Text and tree similarity miss a problem rewritten with another algorithm and other names; its
behaviour gives it away. For each exercise, the HumanEval problems it could be are chosen by
signature (the same number of positional parameters, and the same base types where both sides
annotate them: `List[int]` and `list[float]` are both "list", `int` and `float` both "number"),
then the `functional_candidates` closest of them by a cheap similarity (AST tau plus the word
overlap of the two prompts). Each (exercise, candidate) pair is one sandbox job: the problem's
prompt with a `pass` body (it defines the helpers some tests call, e.g. `poly` for HumanEval/32),
then the whole exercise, then the problem's `check(<exercise function>)`. A pass removes the
exercise, with the problem named. Model-written code only runs in the sandbox, which fails closed.

    python -c "from pipeline.stages.decontaminate.functional import signature; print(signature('def f(a: list, b=1): pass', 'f'))"
"""

from __future__ import annotations

import ast
import re
import time
from dataclasses import dataclass

import numpy as np

from pipeline.core.schema import exercise_program, join_program
from pipeline.sandbox import Job, Sandbox, SandboxConfig

# Base types a paraphrase keeps while it renames everything else; None = not annotated or not one of these.
TYPE_GROUPS = {
    "list": "list", "List": "list", "Sequence": "list", "Iterable": "list",
    "tuple": "tuple", "Tuple": "tuple",
    "dict": "dict", "Dict": "dict", "Mapping": "dict",
    "set": "set", "Set": "set", "frozenset": "set", "FrozenSet": "set",
    "str": "str", "int": "number", "float": "number", "bool": "bool",
}
WORD = re.compile(r"[a-z]{3,}")


@dataclass(frozen=True)
class Signature:
    required: int  # positional parameters without a default
    total: int  # all positional parameters
    params: tuple[str | None, ...]  # base type per positional parameter
    returns: str | None

    def accepts(self, other: Signature) -> bool:
        """Can a function with this signature stand in for `other`'s (called with other.total arguments)?"""
        if not self.required <= other.total <= self.total:
            return False
        pairs = list(zip(self.params, other.params, strict=False)) + [(self.returns, other.returns)]
        return all(a is None or b is None or a == b for a, b in pairs)


def base_type(annotation: ast.expr | None) -> str | None:
    node = annotation
    if isinstance(node, ast.Subscript):  # List[int] -> List
        node = node.value
    if isinstance(node, ast.Attribute):  # typing.List -> List
        node = ast.Name(node.attr)
    if isinstance(node, ast.Constant) and isinstance(node.value, str):  # "List[int]" (a string annotation)
        try:
            return base_type(ast.parse(node.value, mode="eval").body)
        except SyntaxError:
            return None
    return TYPE_GROUPS.get(node.id) if isinstance(node, ast.Name) else None


def signature(code: str, name: str) -> Signature | None:
    """The signature of the top-level function `name` in `code`; None when it is not there or does not parse."""
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None
    fn = next((n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == name), None)
    if fn is None:
        return None
    positional = fn.args.posonlyargs + fn.args.args
    return Signature(len(positional) - len(fn.args.defaults), len(positional),
                     tuple(base_type(a.annotation) for a in positional), base_type(fn.returns))


def prompt_words(text: str) -> frozenset[str]:
    return frozenset(WORD.findall(text.lower()))


def jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    return len(a & b) / len(a | b) if a or b else 0.0


@dataclass(frozen=True)
class FunctionalResult:
    """(records x problems): 1 where the record's function passed the problem's tests, 0 where it ran and
    gave a wrong answer to one of them (a failed assert: a different behaviour), -1 where it did not run
    (no compatible signature, not among the candidates, a textbook) or gave no answer (a timeout, an
    exception); and the counts."""

    passed: np.ndarray
    jobs: int
    timeouts: int
    sandbox_s: float


def candidate_problems(rec: dict, problem_sigs: list[Signature | None], problem_words: list[frozenset[str]],
                       tau: np.ndarray, limit: int) -> list[int]:
    """The problems an exercise could be: compatible signature, then the `limit` most similar (0 = all)."""
    p = rec["parsed"]
    sig = signature(exercise_program(p), p["function_name"])
    if sig is None:
        return []
    fits = [k for k, ps in enumerate(problem_sigs) if ps is not None and sig.accepts(ps)]
    words = prompt_words(p["prompt"])
    # Highest similarity first; ties by task number, so the choice is reproducible.
    fits.sort(key=lambda k: (-(tau[k] + jaccard(words, problem_words[k])), k))
    return fits[:limit] if limit else fits


def problem_prelude(problem) -> str:
    """The problem's prompt with a stub body: the helpers its tests call exist; the exercise's code follows."""
    return problem.prompt + "    pass\n\n"


def functional_matches(records: list[dict], problems: list, tau: np.ndarray, limit: int, timeout_s: float,
                       sandbox_config: SandboxConfig, progress: bool = False) -> FunctionalResult:
    """Run each exercise's function against its candidate problems' tests in the sandbox."""
    problem_sigs = [signature(p.code, p.entry_point) for p in problems]
    problem_words = [prompt_words(p.prompt) for p in problems]
    jobs, owners, program_lines = [], [], []
    for i, rec in enumerate(records):
        if rec["kind"] != "exercise":
            continue
        program = exercise_program(rec["parsed"])
        name = rec["parsed"]["function_name"]
        for k in candidate_problems(rec, problem_sigs, problem_words, tau[i], limit):
            jobs.append(Job(join_program(problem_prelude(problems[k]), program), test=problems[k].test,
                            check=f"check({name})",
                            job_id=f"{rec['id']}|{problems[k].task_id}", timeout_s=timeout_s))
            owners.append((i, k))
            program_lines.append(jobs[-1].program.count("\n") + 1)
    passed = np.full((len(records), len(problems)), -1, dtype=np.int64)
    t0 = time.monotonic()
    verdicts = []
    if jobs:
        with Sandbox(sandbox_config) as sandbox:
            verdicts = sandbox.run(jobs, progress=progress)
    for (i, k), verdict, lines in zip(owners, verdicts, program_lines, strict=True):
        if verdict.passed:
            passed[i, k] = 1
        elif (verdict.status == "failed" and verdict.error_type == "AssertionError"
              and (verdict.failed_line or 0) > lines):  # an assert of the test, not of the exercise's code
            # Only a wrong answer to the problem's own asserts is a different behaviour; a crash (a
            # TypeError from swapped parameters, a missing module, a name clash) says nothing about it.
            passed[i, k] = 0
    return FunctionalResult(passed, len(jobs), sum(v.status == "timeout" for v in verdicts),
                            round(time.monotonic() - t0, 2))
