"""The filter stage: every record kept or dropped with the right reason, execution in the sandbox."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.core.config import load_config
from pipeline.core.records import RecordError, iter_sharded, read_jsonl, write_jsonl
from pipeline.stages.filter import run_filter
from pipeline.stages.generate import parse_exercise

from .conftest import REPO, kill_when_saved

GOOD = '''```python
def add_up(values: list[int]) -> int:
    """Return the sum of the values.

    >>> add_up([1, 2])
    3
    """
    total = 0
    for v in values:
        total += v
    return total
```
```python
assert add_up([1, 2, 3]) == 6
assert add_up([]) == 0
assert add_up([-1, 1]) == 0
```'''


def exercise(rid: str, text: str) -> dict:
    return {"id": rid, "kind": "exercise", "attributes": {}, "parsed": parse_exercise(text)}


def variant(rid: str, old: str, new: str) -> dict:
    assert old in GOOD
    return exercise(rid, GOOD.replace(old, new))


def textbook(rid: str, text: str, blocks: list[str]) -> dict:
    return {"id": rid, "kind": "textbook", "attributes": {}, "parsed": {"title": "T", "text": text, "code_blocks": blocks}}


PROSE = " ".join(["Python lists keep their order and let you add items as you go."] * 8)

CASES = {
    "ex-00": (exercise("ex-00", GOOD), None),
    "ex-01": (variant("ex-01", "total += v", "total -= v"), "tests_failed:failed"),
    "ex-02": (variant("ex-02", "    total = 0\n    for v in values:\n        total += v\n    return total",
                      "    raise NotImplementedError"), "placeholder_solution"),
    "ex-03": (variant("ex-03", "    total = 0\n", "    import os\n    total = 0\n"), "disallowed_import"),
    "ex-04": (variant("ex-04", "assert add_up([1, 2, 3]) == 6\nassert add_up([]) == 0\nassert add_up([-1, 1]) == 0",
                      "assert True\nassert add_up is not None"), "vacuous_tests"),
    "ex-05": (variant("ex-05", "    total = 0\n", "    while True:\n        pass\n    total = 0\n"),
              "tests_failed:timeout"),
    "ex-06": (variant("ex-06", "assert add_up([1, 2, 3]) == 6\nassert add_up([]) == 0\nassert add_up([-1, 1]) == 0",
                      "assert len([1]) == 1"), "tests_do_not_call_function"),
    "ex-07": (variant("ex-07", "    total = 0\n", "    # TODO: finish\n    total = 0\n"), "placeholder_solution"),
    "ex-08": (variant("ex-08", "    total = 0\n", "    total = 0\n" + "    total += 0\n" * 100), "too_long"),
    "ex-09": (variant("ex-09", "    total = 0\n", "    __import__('os').kill(1, 9)\n    total = 0\n"),
              "tests_failed:failed"),
    "tb-00": (textbook("tb-00", PROSE, ["xs = [1, 2]\nxs.append(3)"]), None),
    "tb-01": (textbook("tb-01", PROSE, ["def broken(:\n    pass"]), "code_syntax_error"),
    "tb-02": (textbook("tb-02", "Too short.", ["x = 1"]), "too_short"),
}


def stage(tmp_path: Path, records: list[dict], *overrides: str, sort: bool = True) -> dict:
    inp = tmp_path / "in"
    order = "id" if sort else None
    write_jsonl(inp / "exercises.jsonl", [r for r in records if r["kind"] == "exercise"], sort_key=order)
    write_jsonl(inp / "textbooks.jsonl", [r for r in records if r["kind"] == "textbook"], sort_key=order)
    cfg = load_config(REPO / "params.yaml", [f"filter.input_dir={inp}", f"filter.output_dir={tmp_path / 'out'}",
                                             "filter.sandbox.timeout_s=1.5", "filter.assert_policy=all", *overrides])
    return run_filter(cfg, REPO / "params.yaml", progress=False)


def test_every_record_lands_on_the_right_side_with_its_reason(tmp_path):
    stats = stage(tmp_path, [rec for rec, _ in CASES.values()])
    out = tmp_path / "out"
    kept = {r["id"] for r in read_jsonl(out / "exercises.jsonl") + read_jsonl(out / "textbooks.jsonl")}
    rejected = {r["id"]: r for r in read_jsonl(out / "rejected.jsonl")}
    for rid, (_, reason) in CASES.items():
        if reason is None:
            assert rid in kept, (rid, rejected.get(rid, {}).get("filter_detail"))
        else:
            assert rejected[rid]["filter_reason"] == reason, (rid, rejected[rid]["filter_detail"])
            assert rejected[rid]["parsed"] == CASES[rid][0]["parsed"]  # the record itself is kept whole
    assert stats["exercise"]["in"] == 10 and stats["exercise"]["kept"] == 1
    assert stats["textbook"] == {"in": 3, "kept": 1, "dropped": 2,
                                 "dropped_by_reason": {"code_syntax_error": 1, "too_short": 1}}
    assert stats["isolation"] == "bwrap"
    assert "AssertionError" in rejected["ex-01"]["filter_detail"]
    assert "add_up([1, 2, 3]) == 6" in rejected["ex-01"]["filter_detail"]  # names the failing assert


def test_outputs_are_deterministic(tmp_path, caplog):
    # Sorted files (as generate writes them) stream through; unsorted ones are sorted in memory: same outputs.
    records = [rec for rec, _ in CASES.values()]
    stage(tmp_path / "a", records)
    assert "not sorted by id" not in caplog.text
    stage(tmp_path / "b", list(reversed(records)), sort=False)
    assert (tmp_path / "b/in/exercises.jsonl").read_text() != (tmp_path / "a/in/exercises.jsonl").read_text()
    assert "not sorted by id" in caplog.text
    for name in ("exercises.jsonl", "textbooks.jsonl", "rejected.jsonl"):
        assert (tmp_path / "a/out" / name).read_bytes() == (tmp_path / "b/out" / name).read_bytes()


def test_bad_input_is_named(tmp_path):
    with pytest.raises(RecordError, match="records file not found: .*exercises.jsonl"):
        stage_cfg = load_config(REPO / "params.yaml", [f"filter.input_dir={tmp_path / 'none'}",
                                                       f"filter.output_dir={tmp_path / 'out'}"])
        run_filter(stage_cfg, REPO / "params.yaml", progress=False)
    bad = dict(CASES["ex-00"][0])
    bad["parsed"] = {k: v for k, v in bad["parsed"].items() if k != "tests"}
    with pytest.raises(RecordError, match=r"exercises\.jsonl: record 'ex-00' is missing or has a bad parsed\.tests"):
        stage(tmp_path, [bad])
    (tmp_path / "in" / "exercises.jsonl").write_bytes(b'{"id": "ex-1", "kind": "exercise", "parsed": {"x": "\xff"}}\n')
    with pytest.raises(RecordError, match="exercises.jsonl:1: not UTF-8"):
        run_filter(load_config(REPO / "params.yaml", [f"filter.input_dir={tmp_path / 'in'}",
                                                      f"filter.output_dir={tmp_path / 'out'}"]),
                   REPO / "params.yaml", progress=False)


def test_empty_input_gives_empty_outputs(tmp_path):
    stats = stage(tmp_path, [])
    assert stats["exercise"] == {"in": 0, "kept": 0, "dropped": 0, "dropped_by_reason": {}, "assert_policy": "all",
                                 "kept_with_dropped_asserts": 0, "asserts_dropped": 0,
                                 "kept_with_rewritten_asserts": 0, "asserts_rewritten": 0}
    assert (tmp_path / "out/exercises.jsonl").read_text() == ""


def test_sharded_work_streams_and_resumes_after_a_crash(tmp_path):
    calls = []

    def items():  # a stream: the shards are cut from it as it goes
        yield from ({"id": i} for i in range(10))

    def fn(shard):
        calls.append([r["id"] for r in shard])
        if len(calls) == 3 and not (tmp_path / "crashed").exists():
            (tmp_path / "crashed").touch()
            raise KeyboardInterrupt  # the stage dies in its third shard
        return [{**r, "double": r["id"] * 2} for r in shard]

    def run(fingerprint: str) -> list[dict]:
        return list(iter_sharded(items(), 3, tmp_path / "w", fingerprint, fn))

    results = iter_sharded(items(), 3, tmp_path / "w", "fp", fn)
    assert next(results) == {"id": 0, "double": 0} and calls == [[0, 1, 2]]  # one shard done, not the rest
    with pytest.raises(KeyboardInterrupt):
        list(results)
    calls.clear()
    out = run("fp")
    assert calls == [[6, 7, 8], [9]]  # the two finished shards were not redone
    assert out == [{"id": i, "double": 2 * i} for i in range(10)]
    calls.clear()
    run("other-config")
    assert len(calls) == 4  # another config matches no finished shard


@pytest.mark.slow
def test_killed_filter_resumes_to_the_same_output(tmp_path):
    # Slow exercises (each test sleeps 0.3 s) in shards of 2: kill after the first shard lands.
    slow = [variant(f"ex-{i:02d}", "    total = 0\n", "    import time\n    time.sleep(0.3)\n    total = 0\n")
            for i in range(12)]
    for rec in slow:
        rec["parsed"]["imports"] = ""
    records = slow
    inp = tmp_path / "in"
    write_jsonl(inp / "exercises.jsonl", records)
    write_jsonl(inp / "textbooks.jsonl", [])
    args = [sys.executable, "-m", "pipeline", "filter", "-q", "--config", str(REPO / "params.yaml"),
            "--set", f"filter.input_dir={inp}", "--set", "filter.shard_size=2",
            "--set", "filter.allowed_imports=[time]", "--set", "filter.check_vacuous_tests=false"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(args + ["--set", f"filter.output_dir={tmp_path / 'killed'}"], env=env, cwd=tmp_path)
    shards = tmp_path / "killed" / ".shards"
    finished = kill_when_saved(proc, shards, "shard-*.jsonl", 2, timeout=60)
    assert 2 <= len(finished) < 6
    # Watch the shard folder during the resumed run: finished shards are reused, not rewritten.
    resumed = subprocess.Popen(args + ["--set", f"filter.output_dir={tmp_path / 'killed'}"], env=env, cwd=tmp_path)
    seen = {}
    while resumed.poll() is None:
        for p in shards.glob("shard-*.jsonl"):
            try:
                seen[p.name] = p.stat().st_mtime_ns
            except FileNotFoundError:
                pass
        time.sleep(0.01)
    assert resumed.returncode == 0
    assert all(seen.get(name, mtime) == mtime for name, mtime in finished.items())
    subprocess.run(args + ["--set", f"filter.output_dir={tmp_path / 'clean'}"], env=env, cwd=tmp_path, check=True)
    for name in ("exercises.jsonl", "rejected.jsonl"):
        assert (tmp_path / "killed" / name).read_bytes() == (tmp_path / "clean" / name).read_bytes()
    assert json.loads((tmp_path / "clean/stats.json").read_text())["exercise"]["kept"] == 12


GOOD_TESTS = "assert add_up([1, 2, 3]) == 6\nassert add_up([]) == 0\nassert add_up([-1, 1]) == 0"
POLICY_CASES = {
    # one hand-computed expected value wrong among four asserts: dropped, the rest kept
    "ex-10": (GOOD_TESTS + "\nassert add_up([5]) == 6", None),
    "ex-11": (GOOD_TESTS + "\nassert add_up([5]) == 6\nassert add_up([7]) == 8", "tests_failed:too_many_failing"),
    "ex-12": (GOOD_TESTS + "\nassert add_up(None) == 0", "tests_failed:exception"),
    # three asserts left, but one of them also passes with a `pass` body: too weak to keep
    "ex-13": ("assert add_up([1, 2, 3]) == 6\nassert add_up([-1, 1]) == 0\nassert add_up([2]) != 5\n"
              "assert add_up([5]) == 6", "tests_failed:too_few_kept"),
    "ex-14": (GOOD_TESTS, None),
    "ex-15": ("assert True\nassert add_up is not None", "vacuous_tests"),
}


def test_drop_failing_policy_keeps_one_wrong_assert_out_with_safeguards(tmp_path):
    records = [variant(rid, GOOD_TESTS, tests) for rid, (tests, _) in POLICY_CASES.items()]
    stats = stage(tmp_path, records, "filter.assert_policy=drop_failing")
    out = tmp_path / "out"
    kept = {r["id"]: r for r in read_jsonl(out / "exercises.jsonl")}
    rejected = {r["id"]: r for r in read_jsonl(out / "rejected.jsonl")}
    for rid, (_, reason) in POLICY_CASES.items():
        if reason is None:
            assert rid in kept, (rid, rejected.get(rid, {}).get("filter_detail"))
        else:
            assert rejected[rid]["filter_reason"] == reason, (rid, rejected[rid]["filter_detail"])
    assert kept["ex-10"]["parsed"]["tests"] == GOOD_TESTS + "\n"
    assert kept["ex-10"]["dropped_asserts"] == [{"assert": "assert add_up([5]) == 6", "values": ["5", "6"]}]
    assert "dropped_asserts" not in kept["ex-14"] and kept["ex-14"]["parsed"]["tests"] == GOOD_TESTS
    assert stats["exercise"]["kept_with_dropped_asserts"] == 1 and stats["exercise"]["asserts_dropped"] == 1
    # The default policy keeps none of the exercises with a failing assert.
    stats = stage(tmp_path / "all", records)
    assert stats["exercise"]["kept"] == 1 and stats["exercise"]["assert_policy"] == "all"


OBSERVED_CASES = {
    # the teacher's code is right, one hand-computed value is wrong: it becomes the value returned
    "ob-1": (GOOD_TESTS + "\nassert add_up([5]) == 6", None),
    "ob-2": (GOOD_TESTS + "\nassert add_up([5]) == 6\nassert add_up([7, 1]) == 9", None),
    # an input that makes the solution raise: that assert goes, the rest stay
    "ob-3": (GOOD_TESTS + "\nassert add_up(None) == 0\nassert add_up([5]) > 6", None),
    # one expected value matched: too little evidence that the code does what the teacher meant
    "ob-4": ("assert add_up([1, 2, 3]) == 6\nassert add_up([5]) == 6\nassert add_up([7]) == 8", "tests_failed:no_agreement"),
    # two matched, but both expect 0: a constant function matches them too
    "ob-5": ("assert add_up([]) == 0\nassert add_up([-1, 1]) == 0\nassert add_up([5]) == 6\nassert add_up([2]) == 3",
             "tests_failed:no_agreement"),
    # after the raising assert goes, two are left
    "ob-6": ("assert add_up([1, 2, 3]) == 6\nassert add_up([]) == 0\nassert add_up(None) == 0", "tests_failed:too_few_kept"),
    "ob-7": (GOOD_TESTS, None),
}


def test_observed_policy_writes_the_returned_value_into_wrong_asserts_under_safeguards(tmp_path):
    records = [variant(rid, GOOD_TESTS, tests) for rid, (tests, _) in OBSERVED_CASES.items()]
    # A solution that answers differently each time for long inputs: its rewritten assert fails when run again.
    records.append(variant("ob-8", "    return total", "    import random\n"
                           "    return total + (random.randint(1, 10 ** 9) if len(values) > 3 else 0)"))
    records[-1]["parsed"]["tests"] = GOOD_TESTS + "\nassert add_up([1, 1, 1, 1]) == 4"
    stats = stage(tmp_path, records, "filter.assert_policy=observed", "filter.min_agreeing_asserts=2")
    out = tmp_path / "out"
    kept = {r["id"]: r for r in read_jsonl(out / "exercises.jsonl")}
    rejected = {r["id"]: r for r in read_jsonl(out / "rejected.jsonl")}
    for rid, (_, reason) in OBSERVED_CASES.items():
        if reason is None:
            assert rid in kept, (rid, rejected.get(rid, {}).get("filter_detail"))
        else:
            assert rejected[rid]["filter_reason"] == reason, (rid, rejected[rid]["filter_detail"])
    assert rejected["ob-8"]["filter_reason"] == "tests_failed:not_reproducible"
    assert kept["ob-1"]["parsed"]["tests"] == GOOD_TESTS + "\nassert add_up([5]) == 5\n"
    assert kept["ob-1"]["rewritten_asserts"] == [{"assert": "assert add_up([5]) == 6", "observed": "assert add_up([5]) == 5",
                                                  "values": ["5", "6"]}]
    assert kept["ob-2"]["parsed"]["tests"].endswith("assert add_up([5]) == 5\nassert add_up([7, 1]) == 8\n")
    assert kept["ob-3"]["parsed"]["tests"] == GOOD_TESTS + "\n"
    assert [d["assert"] for d in kept["ob-3"]["dropped_asserts"]] == ["assert add_up(None) == 0", "assert add_up([5]) > 6"]
    assert "rewritten_asserts" not in kept["ob-7"] and kept["ob-7"]["parsed"]["tests"] == GOOD_TESTS
    assert stats["exercise"]["kept_with_rewritten_asserts"] == 2 and stats["exercise"]["asserts_rewritten"] == 3
    # With one matching value enough, ob-4 is kept (its two wrong values rewritten); ob-5 too.
    stage(tmp_path / "one", records, "filter.assert_policy=observed", "filter.min_agreeing_asserts=1")
    kept_one = {r["id"] for r in read_jsonl(tmp_path / "one/out/exercises.jsonl")}
    assert {"ob-4", "ob-5"} <= kept_one


def test_assert_policy_config_errors_name_the_key(tmp_path):
    from pipeline.core.config import ConfigError

    with pytest.raises(ConfigError, match="filter.assert_policy: 'lenient' is not allowed"):
        stage(tmp_path, [], "filter.assert_policy=lenient")
    with pytest.raises(ConfigError, match="filter.min_agreeing_asserts: must be >= 0"):
        stage(tmp_path, [], "filter.min_agreeing_asserts=-1")
    with pytest.raises(ConfigError, match="filter.max_dropped_fraction: must be in"):
        stage(tmp_path, [], "filter.max_dropped_fraction=1.5")
    with pytest.raises(ConfigError, match="filter.min_kept_asserts: must be >= 1"):
        stage(tmp_path, [], "filter.min_kept_asserts=0")
