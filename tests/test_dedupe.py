"""The dedupe stage: exact and near duplicates, survivors, determinism, MinHash accuracy, bad input."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from datasketch.lsh import _optimal_param

from pipeline.core.config import ConfigError, load_config
from pipeline.core.records import RecordError, dumps
from pipeline.stages import dedupe
from pipeline.stages.dedupe import (
    MinHasher,
    band_hashes,
    candidate_pairs,
    candidate_probability,
    decide,
    estimate_jaccard,
    jaccard,
    lsh_candidates,
    lsh_params,
    optimal_bands,
    residual_pairs,
    run_dedupe,
    shingle_set,
    tokenize,
)
from pipeline.stages.dedupe.index import split_blocks

from .conftest import REPO, kill_when_saved

OUTPUTS = ("exercises.jsonl", "textbooks.jsonl", "removed.jsonl", "resolved_config.yaml")

# A 30-line function; `{name}` and the marked lines vary in the tests.
LONG_PROMPT = '''def {name}(readings, window, limit):
    """Smooth sensor readings with a moving average and flag the values above a limit."""'''
LONG_BODY = '''    if window <= 0:
        raise ValueError("window must be positive")
    smoothed = []
    running = 0.0
    for index, value in enumerate(readings):
        running += value
        if index >= window:
            running -= readings[index - window]
        count = min(index + 1, window)
        smoothed.append(running / count)
    flagged = []
    for position, level in enumerate(smoothed):
        if level > limit:
            flagged.append(position)
    peaks = {}
    for position in flagged:
        bucket = position // window
        peaks.setdefault(bucket, []).append(smoothed[position])
    summary = {key: max(vals) for key, vals in peaks.items()}
    ratio = len(flagged) / len(readings) if readings else 0.0
    report = {
        "smoothed": smoothed,
        "flagged": flagged,
        "peaks": summary,
        "ratio": round(ratio, 3),
    }
    if not flagged:
        report["status"] = "quiet"
    else:
        report["status"] = "alert"
    return report'''


def exercise(rid: str, prompt: str, solution: str, **extra) -> dict:
    name = prompt.split("(")[0].removeprefix("def ").strip()
    return {"id": rid, "kind": "exercise", **extra,
            "parsed": {"function_name": name, "imports": "", "helpers": "", "prompt": prompt,
                       "docstring": "", "solution": solution, "tests": f"assert {name} is not None"}}


def textbook(rid: str, text: str) -> dict:
    return {"id": rid, "kind": "textbook", "parsed": {"title": "T", "text": text, "code_blocks": []}}


def write_inputs(root: Path, exercises: list[dict], textbooks: list[dict], raw: bool = False) -> None:
    (root / "in").mkdir(parents=True, exist_ok=True)
    for name, recs in (("exercises.jsonl", exercises), ("textbooks.jsonl", textbooks)):
        (root / "in" / name).write_text("".join((r if raw else dumps(r)) + "\n" for r in recs), encoding="utf-8")


def run(root: Path, *overrides: str) -> dict:
    cfg = load_config(REPO / "params.yaml", [f"dedupe.input_dir={root}/in", f"dedupe.output_dir={root}/out",
                                             *overrides])
    return run_dedupe(cfg, REPO / "params.yaml", progress=False)


def read(root: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (root / "out" / name).read_text(encoding="utf-8").splitlines()]


def long_exercise(rid: str, name: str = "smooth_and_flag", body: str = LONG_BODY) -> dict:
    return exercise(rid, LONG_PROMPT.format(name=name), body)


# ---------------------------------------------------------------------------------------
# The stage end to end
# ---------------------------------------------------------------------------------------


def test_exact_duplicates_differing_in_whitespace_and_comments_name_the_lowest_id(tmp_path):
    base = exercise("ex-000005", 'def add(a, b):\n    """Add two numbers."""', "    return a + b")
    reflowed = exercise("ex-000002", 'def add(a,b):\n\n    """Add two numbers."""',
                        "    # the sum\n    return (a +  b)  # done")
    third = exercise("ex-000009", 'def add(a, b):\n    """Add two numbers."""', "    return a + b\n\n")
    other_doc = exercise("ex-000001", 'def add(a, b):\n    """Return the sum of a and b."""', "    return a + b")
    write_inputs(tmp_path, [base, reflowed, third, other_doc], [])
    stats = run(tmp_path, "dedupe.near=false")
    kept = read(tmp_path, "exercises.jsonl")
    removed = {r["id"]: r for r in read(tmp_path, "removed.jsonl")}
    # Docstring wording is not whitespace: ex-000001 stays.
    assert [r["id"] for r in kept] == ["ex-000001", "ex-000002"]
    assert set(removed) == {"ex-000005", "ex-000009"}
    for rec in removed.values():
        assert rec["duplicate_of"] == "ex-000002" and rec["kind_of_duplicate"] == "exact" and rec["jaccard"] == 1.0
        assert rec["parsed"]["function_name"] == "add"  # the whole record, plus the reason
    assert stats["exercise"]["removed_exact"] == 2 and stats["exercise"]["clusters"] == 1
    assert kept[1] == reflowed  # kept records are copied unchanged


AST_EQUAL = [  # one function in three layouts: quoting, parentheses, commas, elif, numbers, continuations
    '''def f(x, y):
    """Pick.

    Long."""
    if x > 0:
        return "a" + str(y)
    else:
        if x < -16:
            return [1, 2]
    return {"k": x}''',
    """def f(x,y):
  '''Pick.

  Long.'''
  if (x > 0): return 'a' + str(y)  # early
  elif x < -0x10:
    return [1, 2,]
  return {'k': \\
  x}""",
    '''def f(x, y, ):
    """Pick.

    Long."""
    if x > 0:
        return "" "a" + str((y))
    elif x < -1_6: return [1, 2]
    return {"k": x};''',
]


def test_ast_equal_code_shares_its_exact_key_and_its_screen_key():
    keys = {dedupe.exact_key("exercise", code) for code in AST_EQUAL}
    screens = {dedupe.screen_key("exercise", dedupe.tokenize("exercise", code), code) for code in AST_EQUAL}
    assert keys == {dedupe.exact_key("exercise", AST_EQUAL[0])} and len(screens) == 1
    changed = AST_EQUAL[0].replace("str(y)", "repr(y)")
    assert dedupe.screen_key("exercise", dedupe.tokenize("exercise", changed), changed) not in screens


def test_reindented_code_and_docstring_is_an_exact_duplicate():
    four = 'def f(x):\n    """Square x.\n\n    Returns x * x.\n    """\n    return x * x'
    two = 'def f(x):\n  """Square x.\n\n  Returns x * x.\n  """\n  return x*x'
    reworded = four.replace("Returns", "Gives")
    assert dedupe.exact_key("exercise", four) == dedupe.exact_key("exercise", two)
    assert dedupe.exact_key("exercise", four) != dedupe.exact_key("exercise", reworded)
    broken = "def f(x:\n    return x"  # does not parse: the token stream is the normal form
    assert dedupe.exact_key("exercise", broken) == (dedupe.exact_key("exercise", broken + "  # note")[0], False)


def test_near_duplicates_removed_while_different_functions_sharing_boilerplate_are_kept(tmp_path):
    original = long_exercise("ex-000010")
    renamed = long_exercise("ex-000011", body=LONG_BODY.replace("ratio", "share"))  # a renamed variable
    one_line = long_exercise("ex-000012", body=LONG_BODY.replace("running / count", "running / max(count, 1)"))
    # Same header, guard and report boilerplate, different logic: not a duplicate.
    different = long_exercise("ex-000013", body=LONG_BODY.split("    smoothed = []")[0] + '''    ordered = sorted(readings)
    middle = len(ordered) // 2
    median = ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2
    spread = [abs(x - median) for x in readings]
    outliers = [i for i, gap in enumerate(spread) if gap > limit * window]
    report = {
        "median": median,
        "outliers": outliers,
    }
    return report''')
    write_inputs(tmp_path, [one_line, different, renamed, original], [])
    sets = {r["id"]: shingle_set("exercise", dedupe.record_text("exercise", r["parsed"]), 5)
            for r in (original, renamed, one_line, different)}
    assert jaccard(sets["ex-000010"], sets["ex-000011"]) >= 0.8
    assert jaccard(sets["ex-000010"], sets["ex-000012"]) >= 0.8
    assert jaccard(sets["ex-000010"], sets["ex-000013"]) < 0.5

    stats = run(tmp_path)
    assert [r["id"] for r in read(tmp_path, "exercises.jsonl")] == ["ex-000010", "ex-000013"]
    removed = read(tmp_path, "removed.jsonl")
    assert [(r["id"], r["duplicate_of"], r["kind_of_duplicate"]) for r in removed] == [
        ("ex-000011", "ex-000010", "near"), ("ex-000012", "ex-000010", "near")]
    for r in removed:
        assert r["jaccard"] == round(jaccard(sets[r["id"]], sets["ex-000010"]), 6) >= 0.8
    assert stats["exercise"]["removed_near"] == 2 and stats["exercise"]["clusters"] == 1
    assert stats["lsh"]["bands"] * stats["lsh"]["rows"] <= 128


def test_an_exact_copy_of_a_near_duplicate_joins_its_cluster(tmp_path):
    near = long_exercise("ex-000003", body=LONG_BODY.replace("ratio", "share"))
    copy = long_exercise("ex-000004", body=LONG_BODY.replace("ratio", "share") + "  # trailing comment")
    write_inputs(tmp_path, [copy, near, long_exercise("ex-000007")], [])
    run(tmp_path)
    removed = {r["id"]: r for r in read(tmp_path, "removed.jsonl")}
    assert [r["id"] for r in read(tmp_path, "exercises.jsonl")] == ["ex-000003"]
    assert removed["ex-000004"]["kind_of_duplicate"] == "exact" and removed["ex-000004"]["duplicate_of"] == "ex-000003"
    assert removed["ex-000007"]["kind_of_duplicate"] == "near" and removed["ex-000007"]["duplicate_of"] == "ex-000003"


def test_without_exact_dedupe_copies_go_as_near_duplicates_and_main_prints_a_summary(tmp_path, capsys):
    copy = long_exercise("ex-000002", body=LONG_BODY + "  # a comment")
    write_inputs(tmp_path, [long_exercise("ex-000001"), copy], [])
    args = argparse.Namespace(config=str(REPO / "params.yaml"), quiet=True, verbose=False, overrides=[
        f"dedupe.input_dir={tmp_path}/in", f"dedupe.output_dir={tmp_path}/out", "dedupe.exact=false"])
    assert dedupe.main(args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["removed"] == {"exercise": 1, "textbook": 0} and summary["bands"] == 16  # dedupe.candidate_recall 0.99 at 0.8: 16 bands of 6 rows
    [removed] = read(tmp_path, "removed.jsonl")
    assert (removed["duplicate_of"], removed["kind_of_duplicate"], removed["jaccard"]) == ("ex-000001", "near", 1.0)


def test_textbooks_dedupe_separately_from_exercises(tmp_path):
    words = ("Lists in Python hold items in order. You can append to a list, slice it, and iterate over it "
             "with a for loop. A list comprehension such as [x * x for x in range(10)] builds a new list "
             "from an old one. Sorting with sorted() returns a new list while list.sort() works in place. "
             "Use len() to count the items and the in operator to test membership quickly.")
    sections = [
        textbook("tb-000002", words),
        textbook("tb-000001", words.replace(" ", "  ").replace(". ", ".\n\n")),  # whitespace only
        textbook("tb-000003", words.replace("quickly", "at once")),  # near
        textbook("tb-000004", "Dictionaries map keys to values. " * 3 + "They are hash tables with fast lookup."),
    ]
    write_inputs(tmp_path, [long_exercise("ex-000001")], sections)
    stats = run(tmp_path)
    assert [r["id"] for r in read(tmp_path, "textbooks.jsonl")] == ["tb-000001", "tb-000004"]
    assert [(r["id"], r["duplicate_of"], r["kind_of_duplicate"]) for r in read(tmp_path, "removed.jsonl")] == [
        ("tb-000002", "tb-000001", "exact"), ("tb-000003", "tb-000001", "near")]
    assert stats["textbook"]["in"] == 4 and stats["exercise"]["kept"] == 1 and stats["removed"] == {
        "exercise": 0, "textbook": 2}


def synthetic_exercises(n: int, seed: int = 0) -> list[dict]:
    """Varied functions plus copies and near copies (ids shuffled, so survivors are not always first)."""
    rng = np.random.default_rng(seed)
    ops = ["+", "-", "*", "//", "%"]
    recs = []
    for i in range(n):
        names = [f"v{rng.integers(1e6)}" for _ in range(6)]
        lines = [f"    {names[j]} = {names[j - 1]} {ops[rng.integers(5)]} {rng.integers(1000)}" for j in range(1, 6)]
        recs.append(exercise(f"ex-{i:06d}", f'def f{i}({names[0]}):\n    """Doc {i}."""',
                             "\n".join(lines) + f"\n    return {names[5]}"))
    for i in range(0, n, 7):
        rec = json.loads(dumps(recs[i]))
        rec["id"] = f"ex-{n + i:06d}"
        rec["parsed"]["solution"] += "  # copy"
        recs.append(rec)
    rng.shuffle(recs)
    return recs


def test_outputs_are_byte_identical_across_runs_and_worker_processes(tmp_path, monkeypatch):
    write_inputs(tmp_path, synthetic_exercises(300), [textbook("tb-000001", "Some text about loops " * 20)])
    first = run(tmp_path)
    outputs = {name: (tmp_path / "out" / name).read_bytes() for name in OUTPUTS}
    assert first["exercise"]["removed_exact"] == len(range(0, 300, 7))
    # Tiny blocks and two spawned workers: the pooled path must give the same bytes.
    monkeypatch.setattr(decide, "SPANS_PER_TASK", 8)
    second = run(tmp_path, "dedupe.workers=2", "dedupe.shard_bytes=4096")
    assert second["timing"]["resumed"]["exercise"]["blocks"] > 10
    assert not (tmp_path / "out" / ".shards").exists()  # work in progress is gone once the outputs are written
    assert second["timing"]["workers"] == 2
    # The resolved config records the worker count; every data output is byte-identical.
    assert {name: (tmp_path / "out" / name).read_bytes() for name in OUTPUTS if name != "resolved_config.yaml"} == {
        k: v for k, v in outputs.items() if k != "resolved_config.yaml"}
    assert {k: v for k, v in first.items() if k != "timing"} == {k: v for k, v in second.items() if k != "timing"}
    written = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert written["exercise"] == second["exercise"]


def outputs(root: Path) -> dict[str, bytes]:
    return {name: (root / "out" / name).read_bytes() for name in OUTPUTS if name != "resolved_config.yaml"}


def test_a_run_stopped_by_a_bad_record_resumes_from_the_blocks_it_finished(tmp_path):
    recs = synthetic_exercises(300)
    write_inputs(tmp_path / "clean", recs, [textbook("tb-000001", "Some text about loops " * 20)])
    run(tmp_path / "clean")
    bad = json.loads(dumps(recs[249]))
    del bad["parsed"]["prompt"]
    write_inputs(tmp_path, [*recs[:249], bad, *recs[250:]], [textbook("tb-000001", "Some text about loops " * 20)])
    with pytest.raises(RecordError, match="exercises\\.jsonl:250"):
        run(tmp_path, "dedupe.workers=1", "dedupe.shard_bytes=4096")
    saved = list((tmp_path / "out" / ".shards").glob("exercise-*/blocks/block-*.npz"))
    assert len(saved) > 10  # every block before the bad one
    write_inputs(tmp_path, recs, [textbook("tb-000001", "Some text about loops " * 20)])  # the record fixed
    stats = run(tmp_path, "dedupe.workers=1", "dedupe.shard_bytes=4096")
    resumed = stats["timing"]["resumed"]["exercise"]
    assert resumed["blocks_reused"] == len(saved) and resumed["blocks"] > len(saved)
    assert outputs(tmp_path) == outputs(tmp_path / "clean")
    assert not (tmp_path / "out" / ".shards").exists()


def test_a_run_killed_while_confirming_resumes_from_its_saved_steps(tmp_path, monkeypatch):
    # Functions that differ only in their name: near duplicates of one another, many pairs to confirm.
    recs = [*synthetic_exercises(300), *(long_exercise(f"ex-9{i:05d}", name=f"smooth_{i}") for i in range(12))]
    write_inputs(tmp_path / "clean", recs, [])
    clean = run(tmp_path / "clean")
    write_inputs(tmp_path, recs, [])
    monkeypatch.setattr(decide, "CONFIRM_PAIRS", 7)

    def killed(*_: object) -> None:  # the process dies after the last confirmation step
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(decide, "_survivors", killed)
        with pytest.raises(KeyboardInterrupt):
            run(tmp_path)
    steps = -(-clean["exercise"]["candidate_pairs"] // 7)
    assert steps > 3 and len(list((tmp_path / "out" / ".shards").glob("exercise-*/confirm-*/step-*.npy"))) == steps
    stats = run(tmp_path)
    assert stats["timing"]["resumed"]["exercise"]["confirm_steps_reused"] == steps
    assert stats["timing"]["resumed"]["exercise"]["blocks_reused"] == stats["timing"]["resumed"]["exercise"]["blocks"]
    assert outputs(tmp_path) == outputs(tmp_path / "clean")
    # A changed input matches none of the saved work.
    write_inputs(tmp_path, [*synthetic_exercises(300, seed=1), *recs[-12:]], [])
    with monkeypatch.context() as patch:
        patch.setattr(decide, "_survivors", killed)
        with pytest.raises(KeyboardInterrupt):
            run(tmp_path)
    write_inputs(tmp_path, recs, [])
    again = run(tmp_path)["timing"]["resumed"]["exercise"]
    assert again["blocks_reused"] == 0 and again["confirm_steps_reused"] == 0


@pytest.mark.slow
def test_a_run_killed_with_sigkill_resumes_and_writes_what_a_clean_run_writes(tmp_path):
    recs = synthetic_exercises(8000)
    write_inputs(tmp_path, recs, [])
    write_inputs(tmp_path / "clean", recs, [])
    args = [sys.executable, "-m", "pipeline", "dedupe", "-q", "--config", str(REPO / "params.yaml"),
            "--set", f"dedupe.input_dir={tmp_path / 'in'}", "--set", f"dedupe.output_dir={tmp_path / 'out'}",
            "--set", "dedupe.workers=1", "--set", "dedupe.shard_bytes=16384"]
    proc = subprocess.Popen(args, env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=tmp_path)
    finished = kill_when_saved(proc, tmp_path / "out" / ".shards", "exercise-*/blocks/block-*.npz", 5)
    assert len(finished) >= 5
    stats = run(tmp_path, "dedupe.workers=1", "dedupe.shard_bytes=16384")
    resumed = stats["timing"]["resumed"]["exercise"]
    assert len(finished) <= resumed["blocks_reused"] < resumed["blocks"]  # killed mid-index, resumed from its shards
    run(tmp_path / "clean")
    assert outputs(tmp_path) == outputs(tmp_path / "clean")


def test_non_canonical_input_lines_are_written_canonically(tmp_path):
    rec = long_exercise("ex-000001")
    write_inputs(tmp_path, [json.dumps(rec, indent=None, ensure_ascii=True)], [], raw=True)
    run(tmp_path)
    assert (tmp_path / "out" / "exercises.jsonl").read_text(encoding="utf-8") == dumps(rec) + "\n"


def test_empty_inputs_give_empty_outputs_and_zero_stats(tmp_path):
    write_inputs(tmp_path, [], [])
    stats = run(tmp_path)
    for name in ("exercises.jsonl", "textbooks.jsonl", "removed.jsonl"):
        assert (tmp_path / "out" / name).read_bytes() == b""
    assert stats["kept"] == {"exercise": 0, "textbook": 0} and stats["removed"] == {"exercise": 0, "textbook": 0}
    assert stats["exercise"]["in"] == 0 and stats["exercise"]["clusters"] == 0
    assert json.loads((tmp_path / "out" / "stats.json").read_text())["textbook"]["in"] == 0


# ---------------------------------------------------------------------------------------
# Bad input and config
# ---------------------------------------------------------------------------------------


def test_missing_input_file_names_it(tmp_path):
    write_inputs(tmp_path, [], [])
    (tmp_path / "in" / "textbooks.jsonl").unlink()
    with pytest.raises(RecordError, match=r"not found: .*in/textbooks\.jsonl"):
        run(tmp_path)


def test_record_missing_parsed_fields_names_the_record(tmp_path):
    bad = exercise("ex-000042", 'def f():\n    """Doc."""', "    return 1")
    del bad["parsed"]["solution"]
    write_inputs(tmp_path, [long_exercise("ex-000001"), bad], [])
    with pytest.raises(RecordError, match=r"exercises\.jsonl:2: record 'ex-000042' is missing or has a bad "
                                          r"parsed\.solution"):
        run(tmp_path)
    no_parsed = {"id": "tb-000007", "kind": "textbook"}
    write_inputs(tmp_path, [], [no_parsed])
    with pytest.raises(RecordError, match=r"record 'tb-000007' is missing field\(s\) \['parsed'\]"):
        run(tmp_path)


def test_malformed_lines_and_duplicate_ids_are_clear_errors(tmp_path):
    write_inputs(tmp_path, ['{"id": "ex-1", ', ], [], raw=True)
    with pytest.raises(RecordError, match=r"exercises\.jsonl:1: not valid JSON"):
        run(tmp_path)
    write_inputs(tmp_path, [long_exercise("ex-000001"), long_exercise("ex-000001")], [])
    with pytest.raises(RecordError, match="'ex-000001' appears more than once"):
        run(tmp_path)


def test_a_bad_record_deep_in_a_pooled_run_names_its_line(tmp_path):
    recs = synthetic_exercises(200)
    del recs[149]["parsed"]["prompt"]
    write_inputs(tmp_path, recs, [])
    with pytest.raises(RecordError, match=rf"exercises\.jsonl:150: record '{recs[149]['id']}' is missing or has a bad parsed\.prompt"):
        run(tmp_path, "dedupe.workers=2", "dedupe.shard_bytes=2048")


@pytest.mark.parametrize("size", [1, 7, 100, 5000, 10**6])
def test_blocks_cover_the_file_and_end_at_line_ends(tmp_path, size):
    rng = np.random.default_rng(size)
    lines = [b"x" * int(rng.integers(0, 9000)) for _ in range(200)]
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"\n".join(lines))  # no newline at the end
    blocks = list(split_blocks(path, size))
    assert [off for off, _ in blocks] == [0, *np.cumsum([n for _, n in blocks])[:-1].tolist()]
    assert sum(n for _, n in blocks) == path.stat().st_size
    data = path.read_bytes()
    for off, n in blocks[:-1]:
        assert n >= size and data[off + n - 1: off + n] == b"\n" and b"\n" not in data[off + size - 1: off + n - 1]


def test_threshold_out_of_range_is_a_config_error():
    with pytest.raises(ConfigError, match=r"dedupe\.threshold"):
        load_config(REPO / "params.yaml", ["dedupe.threshold=1.5"])
    with pytest.raises(ConfigError, match=r"dedupe\.candidate_recall"):
        load_config(REPO / "params.yaml", ["dedupe.candidate_recall=1.0"])


# ---------------------------------------------------------------------------------------
# The pieces
# ---------------------------------------------------------------------------------------


def test_tokenizer_keeps_code_as_written():
    assert tokenize("exercise", "def F(x):  # Note\n    return x**2 + 1.5e-3 != 'A b'") == [
        "def", "F", "(", "x", ")", ":", "return", "x", "**", "2", "+", "1.5e-3", "!=", "'A b'"]


def test_estimated_jaccard_is_close_to_true_jaccard():
    hasher = MinHasher(128, seed=1234)
    base = LONG_PROMPT.format(name="f") + "\n" + LONG_BODY
    variants = [base.replace("ratio", "share"), base.replace("smoothed", "averaged"),
                base.replace("flagged", "hits").replace("peaks", "tops"), base[: len(base) // 2]]
    a = shingle_set("exercise", base, 5)
    for text in variants:
        b = shingle_set("exercise", text, 5)
        sigs = hasher.signatures(np.concatenate([a, b]), np.array([len(a), len(b)]))
        assert abs(estimate_jaccard(sigs[0], sigs[1]) - jaccard(a, b)) < 0.1


@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.7, 0.8, 0.9, 0.95])
@pytest.mark.parametrize("num_perm", [64, 128, 256])
def test_bands_and_rows_match_datasketch(threshold, num_perm):
    assert optimal_bands(threshold, num_perm) == _optimal_param(threshold, num_perm, 0.5, 0.5)


def test_candidate_pairs_from_buckets():
    bh = np.array([[1, 9], [2, 8], [1, 7], [3, 8], [1, 6]], np.uint64)
    assert candidate_pairs(bh).tolist() == [[0, 2], [0, 4], [1, 3], [2, 4]]
    big = np.zeros((40, 1), np.uint64)  # one huge bucket: a star plus a chain, O(size) pairs
    pairs = candidate_pairs(big, all_pairs_bucket=16)
    assert len(pairs) == 39 + 38 and (pairs[:, 0] < pairs[:, 1]).all()


def test_bands_and_rows_meet_the_candidate_recall_at_the_threshold():
    bands, rows = lsh_params(0.8, 128, 0.99)
    assert (bands, rows) == (16, 6) and candidate_probability(0.8, bands, rows) >= 0.99
    # The balanced choice it replaces: a pair at exactly 0.8 became a candidate 40% of the time.
    assert lsh_params(0.8, 128, 0.0) == optimal_bands(0.8, 128) == (9, 13)
    assert candidate_probability(0.8, 9, 13) < 0.41


def crowded_family(n: int = 60, source: int = 20, copy: int = 55, seed: int = 0) -> np.ndarray:
    """Signatures (16 bands x 6 rows) of records sharing boilerplate: at each position a member takes
    the boilerplate's value 85% of the time, else one of its own. Row `copy` is a near copy of row
    `source` built so that every band where the two agree is all boilerplate: they meet only in
    crowded buckets, yet share some of source's own values (at positions of bands they differ in)."""
    rng = np.random.default_rng(seed)
    boiler = rng.integers(1, 2**32, 96, dtype=np.uint32)
    sig = np.where(rng.random((n, 96)) < 0.85, boiler, rng.integers(1, 2**32, (n, 96), dtype=np.uint32))
    sig[copy] = sig[source]
    for band in range(16):
        own = [p for p in range(band * 6, band * 6 + 6) if sig[source, p] != boiler[p]]
        if own:  # the band differs from source's: one of source's own values is replaced
            sig[copy, own[-1]] = rng.integers(1, 2**32, dtype=np.uint32)
    return sig.astype(np.uint32)


def test_a_near_pair_inside_a_crowded_bucket_is_found_by_its_own_signature_values():
    sig = crowded_family()
    assert (sig[20] == sig[55]).mean() >= 0.8  # a near copy: most positions agree
    bh = band_hashes(sig, 16, 6)
    # Bucket by bucket the pair only ever meets in crowded buckets, where the star's centre is an
    # unrelated lower row and other members sit between them: star and chain edges miss it.
    assert [20, 55] not in candidate_pairs(bh).tolist()
    pairs, crowded = lsh_candidates(bh)
    assert crowded[20] and crowded[55]
    rows = np.flatnonzero(crowded)
    found = rows[residual_pairs(sig[rows])]
    # Only the near copy shares values of a member's own: unrelated members are not paired.
    assert found.tolist() == [[20, 55]]


def test_the_stage_finds_a_near_copy_inside_a_family_sharing_boilerplate(tmp_path):
    prelude = LONG_BODY.rsplit("\n", 1)[0]
    rng = np.random.default_rng(3)

    def member(i: int) -> dict:
        names = [f"{['total', 'level', 'spread', 'gap'][k]}_{i}_{k}" for k in range(4)]
        body = "\n".join(f"    {names[k]} = {names[k - 1] if k else 'ratio'} * {rng.integers(2, 99)} + "
                         f"{rng.integers(2, 99)}" for k in range(4))
        return exercise(f"ex-{i:06d}", f'def check_{i}(readings, window, limit):\n    """Check {i}."""',
                        f"{prelude}\n{body}\n    return {names[-1]}")

    family = [member(i) for i in range(1, 121)]
    copy = json.loads(dumps(family[19]))
    copy["id"] = "ex-900000"
    copy["parsed"]["solution"] = copy["parsed"]["solution"].replace("_20_1", "_20_one").replace("_20_2", "_20_two")
    write_inputs(tmp_path, [*family, copy], [])
    sets = [shingle_set("exercise", dedupe.record_text("exercise", r["parsed"]), 5) for r in (*family[:3], copy)]
    assert jaccard(sets[0], sets[1]) < 0.8 and jaccard(sets[1], sets[2]) < 0.8  # members are not duplicates
    stats = run(tmp_path)
    assert [(r["id"], r["duplicate_of"]) for r in read(tmp_path, "removed.jsonl")] == [("ex-900000", "ex-000020")]
    assert stats["exercise"]["crowded_rows"] > 16 and stats["lsh"]["p_candidate_at_threshold"] >= 0.99


def test_duplicate_rate_per_1000_follows_generation_order(tmp_path):
    # 1,000 distinct functions, then 500 more of which every other one repeats an earlier function:
    # the first block has no duplicate, the second (partial) block 250 of 500.
    distinct = [exercise(f"ex-{i:06d}", f'def f{i}(x):\n    """Scale by {i}."""', f"    return x * {i} + {i * i}")
                for i in range(1000)]
    later = [exercise(f"ex-{1000 + i:06d}", f'def f{i}(x):\n    """Scale by {i}."""', f"    return x * {i} + {i * i}")
             if i % 2 == 0 else
             exercise(f"ex-{1000 + i:06d}", f'def g{i}(x):\n    """Shift by {i}."""', f"    return x - {i} * {i + 7}")
             for i in range(500)]
    write_inputs(tmp_path, distinct + later, [])
    stats = run(tmp_path, "dedupe.near=false")
    assert stats["exercise"]["duplicate_rate_per_1000"] == [0.0, 0.5]
