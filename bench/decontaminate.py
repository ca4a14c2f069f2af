"""Benchmark: what the behaviour (functional) signal of the decontaminate stage costs, per 10k exercises,
against the text and tree signals (n-grams, difflib, AST tau) on the same records in the same run.

    .venv/bin/python bench/decontaminate.py                 # 2,000 exercises (~3 min on 2 cores)
    .venv/bin/python bench/decontaminate.py --n 10000       # the full 10k

The records are the labelled set's exercises (tests/data/decontam_labelled.jsonl: HumanEval
paraphrases, look-alikes, unrelated tasks), cycled to --n with fresh ids: a harder mix than a
real run's (most of them have several compatible, similar problems to try), so the per-10k
figure is an upper bound. The last line of stdout is one JSON object: wall seconds of each
part, sandbox jobs per exercise, timeouts, seconds per 10k exercises of the functional signal
and its ratio to the text signals, and the removal rates (the same on every cycle).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from pipeline.core.config import DecontaminateConfig
from pipeline.stages.decontaminate import fired_signals, load_humaneval, score_records

LABELLED = Path(__file__).resolve().parent.parent / "tests" / "data" / "decontam_labelled.jsonl"


def records(n: int) -> tuple[list[dict], list[str]]:
    cases = [json.loads(line) for line in LABELLED.read_text().splitlines()]
    out, expect = [], []
    for i in range(n):
        c = cases[i % len(cases)]
        out.append({"id": f"ex-{i:07d}", "kind": "exercise", "parsed": c["parsed"]})
        expect.append(c["expect"])
    return out, expect


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=2000, help="exercises")
    ap.add_argument("--candidates", type=int, default=DecontaminateConfig().functional_candidates)
    args = ap.parse_args()
    recs, expect = records(args.n)
    problems = load_humaneval()
    dc = DecontaminateConfig(functional_candidates=args.candidates)
    t0 = time.monotonic()
    scores = score_records(recs, problems, dc, progress=True)
    wall = time.monotonic() - t0
    fired = fired_signals(scores, dc)
    removed = sum((m for m in fired.values()), start=0) > 0
    text_s = scores.timing["ngram_difflib_s"] + scores.timing["ast_s"]
    func_s = scores.timing["functional_s"]
    per_10k = 10_000 / args.n
    n_remove = sum(e == "remove" for e in expect)
    report = {
        "exercises": args.n,
        "functional_candidates": args.candidates,
        "cores": os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "wall_s": round(wall, 1),
        "text_signals_s": round(text_s, 2),
        "functional_s": round(func_s, 1),
        "functional_jobs": scores.functional_runs["jobs"],
        "jobs_per_exercise": round(scores.functional_runs["jobs"] / args.n, 1),
        "functional_timeouts": scores.functional_runs["timeouts"],
        "functional_s_per_10k": round(func_s * per_10k, 1),
        "text_signals_s_per_10k": round(text_s * per_10k, 1),
        "functional_over_text": round(func_s / text_s, 1) if text_s else None,
        "paraphrases_removed": round(sum(r for r, e in zip(removed, expect, strict=True) if e == "remove") / n_remove, 4),
        "keeps_removed": round(sum(r for r, e in zip(removed, expect, strict=True) if e == "keep")
                               / (args.n - n_remove), 4),
    }
    print(json.dumps(report, sort_keys=True))


if __name__ == "__main__":
    main()
