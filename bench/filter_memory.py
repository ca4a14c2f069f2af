"""Benchmark: the filter stage's peak memory against its input's size, and against holding the input.

    .venv/bin/python bench/filter_memory.py                       # 10k and 100k records (~8 KB each)
    .venv/bin/python bench/filter_memory.py --sizes 5000,50000

The filter streams: its input (sorted by id, as the generate stage writes it) is merged from the
two files record by record, decided shard by shard (`filter.shard_size`) and written out as it
goes, so its memory should not grow with the input. Here the records are textbook sections (their
checks are static: code blocks parse, length bounds), so the run measures the stage's own memory
and not the sandbox's time; exercises follow the same path through the shards. The baseline,
in the same run, on the same files, is what the stage did before: read every record into a list
and sort it (its peak is the floor of an in-memory stage). Each measurement is a child process;
its peak is the child's own max RSS. The last line of stdout is one JSON object: per size the stage's
and the baseline's peak MB and wall seconds, and the growth of each from the smallest size to the
largest (goal: the stage's under 1.5x while the input grows 10x).
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from pipeline.core.records import dumps  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
WORDS = ("value list loop function return index string number sum count key dictionary set order "
         "element result test case input output range slice append sort filter map").split()


def textbook(i: int, rng: random.Random) -> dict:
    """A textbook record shaped like the generate stage's, about 8 KB."""
    prose = " ".join(rng.choice(WORDS) for _ in range(450))
    code = f"def f_{i}(values):\n    total = 0\n    for v in values:\n        total += v * {i % 97}\n    return total\n"
    text = f"# Section {i}\n\n{prose}\n\n```python\n{code}```\n\n{prose[:1200]}\n"
    return {"id": f"tb-{i:09d}", "kind": "textbook", "attributes": {"topic": "loops"}, "prompt_hash": f"{i:016x}",
            "model": "bench", "sampling": {}, "raw": text, "finish_reason": "stop",
            "usage": {"prompt_tokens": 0, "completion_tokens": 0},
            "parsed": {"title": f"Section {i}", "text": text, "code_blocks": [code]}}


def make_input(folder: Path, n: int, seed: int) -> None:
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "exercises.jsonl").write_text("")
    with (folder / "textbooks.jsonl").open("w", encoding="utf-8") as fh:
        for i in range(n):
            fh.write(dumps(textbook(i, rng)) + "\n")


def child(mode: str, inp: Path, out: Path) -> None:
    if mode == "stage":
        from pipeline.core.config import load_config
        from pipeline.stages.filter import run_filter

        cfg = load_config(REPO / "params.yaml", [f"filter.input_dir={inp}", f"filter.output_dir={out}"])
        stats = run_filter(cfg, REPO / "params.yaml", progress=False)
        assert stats["textbook"]["in"] == stats["textbook"]["kept"], stats["textbook"]
    else:  # the stage before streaming: every record in a list, sorted
        from pipeline.core.records import read_jsonl

        records = read_jsonl(inp / "exercises.jsonl") + read_jsonl(inp / "textbooks.jsonl")
        records.sort(key=lambda r: r["id"])
    # Its own peak (the sandbox's workers are small and fixed in number, whatever the input).
    print(json.dumps({"peak_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}))


def measure(mode: str, inp: Path, out: Path) -> dict:
    t0 = time.monotonic()
    done = subprocess.run([sys.executable, __file__, "--child", mode, "--input", str(inp), "--output", str(out)],
                          check=True, capture_output=True, text=True)
    wall = time.monotonic() - t0
    return {"wall_s": round(wall, 1), **json.loads(done.stdout.strip().splitlines()[-1])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="10000,100000")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--child", choices=("stage", "baseline"))
    ap.add_argument("--input", type=Path)
    ap.add_argument("--output", type=Path)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.input, args.output)
        return
    sizes = [int(s) for s in args.sizes.split(",")]
    result: dict = {"sizes": {}}
    with tempfile.TemporaryDirectory(prefix="filter-bench-") as tmp:
        for n in sizes:
            inp = Path(tmp) / f"in-{n}"
            make_input(inp, n, args.seed)
            mb = sum(p.stat().st_size for p in inp.iterdir()) / 2**20
            stage = measure("stage", inp, Path(tmp) / f"out-{n}")
            baseline = measure("baseline", inp, Path(tmp) / f"out-{n}")
            result["sizes"][str(n)] = {"input_mb": round(mb, 1), "stage": stage, "baseline": baseline}
            print(json.dumps({str(n): result["sizes"][str(n)]}), flush=True)
            for p in inp.iterdir():
                p.unlink()
    first, last = result["sizes"][str(sizes[0])], result["sizes"][str(sizes[-1])]
    result["input_growth"] = round(last["input_mb"] / first["input_mb"], 2)
    result["stage_peak_growth"] = round(last["stage"]["peak_mb"] / first["stage"]["peak_mb"], 2)
    result["baseline_peak_growth"] = round(last["baseline"]["peak_mb"] / first["baseline"]["peak_mb"], 2)
    result["goal_stage_growth_under_1_5x"] = result["stage_peak_growth"] < 1.5
    print(json.dumps(result, sort_keys=True))


if __name__ == "__main__":
    main()
