"""Dedupe stage: exact and MinHash-LSH near-duplicate removal, exercises and textbooks apart.

Exact duplicates share a normal form, the AST dump of an exercise's code (normalize.py). Near
duplicates are found with MinHash LSH over code-aware shingles (minhash.py, lsh.py), and every
candidate pair is confirmed by the true Jaccard of the two shingle sets (decide.py). Fast and
lean at 10M records: the input is indexed in blocks by worker processes, ~50 bytes a record in
memory, and a killed run resumes from the blocks and confirmation steps it saved (index.py,
workers.py). stage.py runs the passes over both kinds and writes the outputs.

Outputs (in ``dedupe.output_dir``): exercises.jsonl and textbooks.jsonl (kept, sorted by
id), removed.jsonl (each removed record with ``duplicate_of``, ``kind_of_duplicate``:
exact|near, and ``jaccard`` to the kept record), stats.json, resolved_config.yaml. The same
input and seed give byte-identical outputs, except stats.json's ``timing``.

    textbook dedupe --set dedupe.threshold=0.85
"""

from __future__ import annotations

from pipeline.stages.dedupe.lsh import (
    ALL_PAIRS_BUCKET,
    band_hashes,
    candidate_pairs,
    candidate_probability,
    lsh_candidates,
    lsh_params,
    optimal_bands,
    residual_pairs,
)
from pipeline.stages.dedupe.minhash import (
    BATCH_DOCS,
    MinHasher,
    estimate_jaccard,
    jaccard,
    shingle_hashes,
    shingle_set,
)
from pipeline.stages.dedupe.normalize import (
    exact_key,
    normal_form,
    raw_tokens,
    record_text,
    screen_key,
    tokenize,
)
from pipeline.stages.dedupe.stage import INPUT_FILES, KINDS, REMOVED_FILE, SHARDS_DIR, main, run_dedupe

__all__ = [
    "ALL_PAIRS_BUCKET", "BATCH_DOCS", "INPUT_FILES", "KINDS", "REMOVED_FILE", "SHARDS_DIR", "MinHasher",
    "band_hashes", "candidate_pairs", "candidate_probability", "estimate_jaccard", "exact_key", "jaccard",
    "lsh_candidates", "lsh_params", "main", "normal_form", "optimal_bands", "raw_tokens", "record_text",
    "residual_pairs", "run_dedupe", "screen_key", "shingle_hashes", "shingle_set", "tokenize",
]
