"""Cost of the likelihood endpoint: NLL of HumanEval's canonical solutions under the default student.

Runs the project's scorer (:class:`pipeline.engines.likelihood.Scorer`: logits at the target positions
only, left-padded batches) and, as the baseline in the same run, the plain way (one text at a time,
logits at every position, log-softmax over all of them), on the same problems, and checks that both
give the same NLL. Goal: all 164 problems in at most 3 minutes per target on 2 cores. The last line
printed is one JSON object; --out writes it to a file as well.

    .venv/bin/python bench/likelihood.py --out bench/results/likelihood.json
    .venv/bin/python bench/likelihood.py --problems 20 --baseline-problems 10      # a quick look
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.core.config import load_preset  # noqa: E402
from pipeline.core.humaneval import load_problems  # noqa: E402
from pipeline.engines.likelihood import Item, Scorer, encode_items  # noqa: E402
from pipeline.engines.student import model_source  # noqa: E402
from pipeline.stages.evaluate.harness import Convention  # noqa: E402

GOAL_S = 180.0


@torch.no_grad()
def plain_nll(scorer: Scorer, items: list[Item]) -> list[float]:
    """The baseline: each text alone, logits and log-softmax at every position."""
    out = []
    for ids, first in encode_items(items, scorer.tokenizer, scorer.chat):
        logits = scorer.model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].float()
        logprobs = torch.log_softmax(logits[:-1], dim=-1)
        targets = torch.tensor(ids[1:])
        out.append(float(-logprobs[first - 1:].gather(1, targets[first - 1:, None]).sum()))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--student", default="gemma-3-270m")
    ap.add_argument("--problems", type=int, default=164)
    ap.add_argument("--baseline-problems", type=int, default=41, help="The baseline's share (it is slow).")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    preset = load_preset(args.student, REPO / "configs")
    conv = Convention("evalplus", "humaneval")
    items = [Item(p["task_id"], conv.base_prompt(p["prompt"]), p["canonical_solution"])
             for p in load_problems(args.problems)]
    t0 = time.monotonic()
    scorer = Scorer(model_source(preset), chat=preset.api == "chat", batch_size=args.batch)
    load_s = time.monotonic() - t0
    t0 = time.monotonic()
    scored = scorer.score(items, progress=True)
    ours_s = time.monotonic() - t0
    sub = items[:args.baseline_problems]
    t0 = time.monotonic()
    plain = plain_nll(scorer, sub)
    plain_s = time.monotonic() - t0
    diff = max(abs(a - s.nll) / s.tokens for a, s in zip(plain, scored, strict=False))
    per_item_ours, per_item_plain = ours_s / len(items), plain_s / len(sub)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO).stdout.strip()
    result = {"bench": "likelihood", "student": preset.name, "problems": len(items), "batch": args.batch,
              "threads": torch.get_num_threads(), "load_s": round(load_s, 1), "score_s": round(ours_s, 1),
              "per_problem_s": round(per_item_ours, 3), "baseline_problems": len(sub),
              "baseline_per_problem_s": round(per_item_plain, 3),
              "speedup": round(per_item_plain / per_item_ours, 2),
              "max_abs_diff_nats_per_token": round(diff, 6),
              "goal_s": GOAL_S, "goal_met": ours_s <= GOAL_S and len(items) == 164,
              "commit": commit, "date": datetime.now(timezone.utc).strftime("%Y-%m-%d")}
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
