"""The decontaminate stage's decisions: every signal's (records x problems) scores, which signals
fire for a record (behaviour outranks text), what removed.jsonl says about a removed record, and
the per-problem similarity report (phi-1 Table 3's similar / non-similar split).

    textbook decontaminate --set decontaminate.ast_threshold=0.9
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tqdm import tqdm

from pipeline.core.config import DecontaminateConfig
from pipeline.stages.decontaminate.functional import functional_matches
from pipeline.stages.decontaminate.signals import (
    AstIndex,
    NgramIndex,
    Problem,
    embedding_scores,
    ngram_text,
    record_units,
    words,
)

SIGNALS = ("ngram", "difflib", "ast", "embedding", "functional")
ROUND = 6
# A HumanEval problem whose whole normalised AST is shorter than this (`return len(string)`,
# `return x + y`: six problems) cannot be told from any one-line getter, so it does not remove a
# record by tau (n-grams and embeddings still apply); its tau is still reported. No config field
# yet (decontaminate.ast_min_tokens would be the place).
MIN_AST_TOKENS = 10


@dataclass
class Scores:
    """(records x problems) matrices, one per signal; rows in record order."""

    ngram: np.ndarray
    candidates: np.ndarray
    difflib: np.ndarray
    ast: np.ndarray
    ast_tokens: np.ndarray  # per problem: length of its normalised AST (MIN_AST_TOKENS gate)
    embedding: np.ndarray | None = None
    functional: np.ndarray | None = None  # 1 passed the problem's tests, 0 failed them, -1 not run
    functional_runs: dict[str, Any] = field(default_factory=dict)
    timing: dict[str, float] = field(default_factory=dict)


def score_records(records: list[dict], problems: list[Problem], dc: DecontaminateConfig,
                  progress: bool = True) -> Scores:
    t0 = time.monotonic()
    grams = NgramIndex(problems, dc.ngram_size, dc.candidate_ngram_size)
    trees = AstIndex(problems)
    t_index = time.monotonic() - t0
    n, p = len(records), len(problems)
    scores = Scores(np.zeros((n, p), dtype=np.int64), np.zeros((n, p), dtype=np.int64), np.zeros((n, p)),
                    np.zeros((n, p)), trees.problem_tokens)
    t_ngram = t_ast = 0.0
    for i, rec in enumerate(tqdm(records, desc="decontaminate", unit="rec", disable=not progress, mininterval=0.5)):
        ta = time.monotonic()
        ws = words(ngram_text(rec))
        scores.ngram[i] = grams.shared(ws, p)
        scores.candidates[i], scores.difflib[i] = grams.candidates(ws, p)
        tb = time.monotonic()
        scores.ast[i] = trees.tau(record_units(rec))
        t_ngram += tb - ta
        t_ast += time.monotonic() - tb
    scores.timing = {"index_s": round(t_index, 2), "ngram_difflib_s": round(t_ngram, 2), "ast_s": round(t_ast, 2)}
    if dc.embedding:
        te = time.monotonic()
        scores.embedding = embedding_scores(records, problems, dc.embedding_model, progress)
        scores.timing["embedding_s"] = round(time.monotonic() - te, 2)
    if dc.functional:
        result = functional_matches(records, problems, scores.ast, dc.functional_candidates, dc.functional_timeout_s,
                                    dc.sandbox, progress)
        scores.functional = result.passed
        scores.functional_runs = {"jobs": result.jobs, "timeouts": result.timeouts}
        scores.timing["functional_s"] = result.sandbox_s
    return scores


def removable_tau(scores: Scores, rows: Any = slice(None)) -> np.ndarray:
    """tau where it may remove a record: 0 for the problems too small to tell apart (MIN_AST_TOKENS)."""
    return np.where(scores.ast_tokens >= MIN_AST_TOKENS, scores.ast[rows], 0.0)


def counted(scores: Scores, matrix: np.ndarray, rows: Any = slice(None)) -> np.ndarray:
    """A text signal's scores where they count. Behaviour outranks text: a record whose function ran
    against a problem's tests and failed them is a different task, however alike it reads (the
    labelled set's look-alikes), so the text signals do not count that problem for it."""
    if scores.functional is None:
        return matrix[rows]
    return np.where(scores.functional[rows] == 0, np.zeros((), dtype=matrix.dtype), matrix[rows])


def text_hits(scores: Scores, dc: DecontaminateConfig) -> dict[str, np.ndarray]:
    """Per text signal, (records x problems): over its threshold, before behaviour has its say."""
    hits = {"ngram": scores.ngram > 0, "difflib": scores.difflib >= dc.difflib_threshold,
            "ast": removable_tau(scores) >= dc.ast_threshold}
    if scores.embedding is not None:
        hits["embedding"] = scores.embedding >= dc.embedding_threshold
    return hits


def any_text_hit(scores: Scores, dc: DecontaminateConfig) -> np.ndarray:
    """(records x problems): some text signal points the record at the problem."""
    return np.logical_or.reduce(list(text_hits(scores, dc).values()))


def fired_signals(scores: Scores, dc: DecontaminateConfig) -> dict[str, np.ndarray]:
    """Per signal, a boolean per record: over its threshold for a problem it counts (see `counted`)."""
    counts = np.ones(scores.ast.shape, dtype=bool) if scores.functional is None else scores.functional != 0
    fired = {s: (hit & counts).any(axis=1) for s, hit in text_hits(scores, dc).items()}
    if scores.functional is not None:
        fired["functional"] = scores.functional.max(axis=1, initial=0) > 0
    return fired


def _best(row: np.ndarray, problems: list[Problem], key: str) -> dict:
    k = int(np.argmax(row))  # ties: the lowest task number
    value = row[k].item()
    return {"task_id": problems[k].task_id if value > 0 else None,
            key: round(value, ROUND) if isinstance(value, float) else value}


def record_report(i: int, scores: Scores, problems: list[Problem], signals: list[str]) -> dict:
    """What removed.jsonl says about one record: the task it matched, the signals that fired, every score."""
    detail = {
        "ngram": _best(counted(scores, scores.ngram, i), problems, "shared_ngrams"),
        "difflib": {**_best(counted(scores, scores.difflib, i), problems, "coverage"),
                    "shared_candidate_ngrams": int(scores.candidates[i].max(initial=0))},
        "ast": _best(counted(scores, removable_tau(scores), i), problems, "tau"),
    }
    if scores.embedding is not None:
        detail["embedding"] = _best(counted(scores, scores.embedding, i), problems, "cosine")
    if scores.functional is not None:
        passed = [problems[k].task_id for k in np.flatnonzero(scores.functional[i] == 1)]
        detail["functional"] = {"task_id": passed[0] if passed else None, "passed_tests_of": passed}
    return {"task_id": detail[signals[0]]["task_id"] if signals else None, "signals": signals, "scores": detail}


def similarity_report(problems: list[Problem], scores: Scores, kept: np.ndarray, ids: list[str],
                      dc: DecontaminateConfig) -> dict:
    """Per HumanEval problem, its closest KEPT record per signal; and the similar / non-similar
    split at each tau level (phi-1 Table 3: pass@1 on problems with / without a near copy). The split
    uses the removal signals: a problem is similar at a level when a kept record reaches that tau, or
    when a kept record's text signals pointed at it (a look-alike kept because its function fails the
    problem's tests: it reads like the problem, whatever it computes)."""
    kept_idx = np.flatnonzero(kept)
    kept_ids = [ids[i] for i in kept_idx]
    text_hit = any_text_hit(scores, dc)

    def closest(matrix: np.ndarray | None, k: int, key: str, integer: bool = False) -> dict:
        if matrix is None:
            return {}
        if not len(kept_idx):
            return {key: 0 if integer else 0.0, f"{key}_record": None}
        col = matrix[kept_idx, k]
        j = int(np.argmax(col))  # records are sorted by id: ties go to the smallest id
        value = int(col[j]) if integer else round(float(col[j]), ROUND)
        return {key: value, f"{key}_record": kept_ids[j] if value > 0 else None}

    rows = []
    for k, p in enumerate(problems):
        rows.append({"task_id": p.task_id, "ast_tokens": int(scores.ast_tokens[k]), **closest(scores.ast, k, "ast_tau"),
                     **closest(scores.ngram, k, "ngram_shared", integer=True),
                     **closest(scores.candidates, k, "candidate_ngram_shared", integer=True),
                     **closest(scores.embedding, k, "embedding_cosine"),
                     "kept_by_behaviour": [kept_ids[j] for j in np.flatnonzero(text_hit[kept_idx, k])]})
    levels = {}
    for level in sorted(set(dc.tau_levels), reverse=True):
        similar = [r["task_id"] for r in rows if r["ast_tau"] >= level or r["kept_by_behaviour"]]
        levels[f"{level:g}"] = {"similar": similar, "non_similar": [r["task_id"] for r in rows if r["task_id"]
                                                                    not in set(similar)],
                                "n_similar": len(similar), "n_non_similar": len(rows) - len(similar)}
    return {
        "kept_records": len(kept_idx),
        "ngram_size": dc.ngram_size,
        "candidate_ngram_size": dc.candidate_ngram_size,
        "metric": "ast_tau = 2*LCS/(len(a)+len(b)) of normalised AST token sequences (max over units)",
        "problems": rows,
        "tau_levels": levels,
    }
