"""The decontaminate stage's core (`run_decontaminate`) and its CLI: score the pool against
HumanEval, remove what a signal points at, write the outputs, the dataset and its card.

    textbook decontaminate --set decontaminate.embedding=true
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from pathlib import Path

import numpy as np

from pipeline.core.artifacts import DecontaminateStats, HumanEvalSimilarity
from pipeline.core.config import RunConfig, configs_dir
from pipeline.core.corpus_stats import read_corpus_stats
from pipeline.core.records import atomic_write_text, write_jsonl
from pipeline.core.stage import stage_cli, write_resolved_config
from pipeline.core.stats import read_stage_stats
from pipeline.stages.decontaminate.card import write_card
from pipeline.stages.decontaminate.dataset import KINDS, dataset_row, load_records, write_dataset
from pipeline.stages.decontaminate.decide import (
    SIGNALS,
    any_text_hit,
    fired_signals,
    record_report,
    score_records,
    similarity_report,
)
from pipeline.stages.decontaminate.signals import load_humaneval

log = logging.getLogger(__name__)


def _per_kind(records: list[dict], mask: np.ndarray | None = None) -> dict[str, int]:
    counts = Counter(r["kind"] for i, r in enumerate(records) if mask is None or mask[i])
    return {kind: counts.get(kind, 0) for kind in KINDS}


def run_decontaminate(cfg: RunConfig, config_path: Path, progress: bool = True) -> dict:
    """The stage's core: returns its stats (also written to stats.json)."""
    dc = cfg.decontaminate
    t0 = time.monotonic()
    records = load_records(Path(dc.input_dir))
    out_dir = Path(dc.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_resolved_config(cfg, configs_dir(config_path), "decontaminate", out_dir)

    problems = load_humaneval()
    scores = score_records(records, problems, dc, progress)
    fired = fired_signals(scores, dc)
    removed_mask = np.zeros(len(records), dtype=bool)
    for mask in fired.values():
        removed_mask |= mask
    kept_mask = ~removed_mask

    removed = []
    for i in np.flatnonzero(removed_mask):
        signals = [s for s in SIGNALS if s in fired and fired[s][i]]
        removed.append({**records[i], "decontamination": record_report(int(i), scores, problems, signals)})
    kept = [r for i, r in enumerate(records) if kept_mask[i]]
    write_jsonl(out_dir / "exercises.jsonl", [r for r in kept if r["kind"] == "exercise"])
    write_jsonl(out_dir / "textbooks.jsonl", [r for r in kept if r["kind"] == "textbook"])
    write_jsonl(out_dir / "removed.jsonl", removed)
    similarity = similarity_report(problems, scores, kept_mask, [r["id"] for r in records], dc)
    HumanEvalSimilarity.parse(similarity, out_dir / "humaneval_similarity.json").write(out_dir / "humaneval_similarity.json")

    td = time.monotonic()
    rows = [dataset_row(r) for r in kept]
    dataset = write_dataset(rows, Path(dc.dataset_dir))
    timing = {**scores.timing, "dataset_s": round(time.monotonic() - td, 2)}
    stats = {
        "in": _per_kind(records),
        "kept": _per_kind(records, kept_mask),
        "removed": _per_kind(records, removed_mask),
        "removed_by_signal": {s: int(m.sum()) for s, m in fired.items()},
        # Flagged by a text signal for a problem whose tests their function ran and failed: kept.
        "kept_by_behaviour": int((any_text_hit(scores, dc).any(axis=1) & kept_mask).sum()),
        "removed_task_ids": sorted({r["decontamination"]["task_id"] for r in removed},
                                   key=lambda t: int(t.rsplit("/", 1)[1])),
        "signals": sorted(fired, key=SIGNALS.index),
        "thresholds": {"ngram_size": dc.ngram_size, "candidate_ngram_size": dc.candidate_ngram_size,
                       "difflib": dc.difflib_threshold, "ast": dc.ast_threshold,
                       **({"embedding": dc.embedding_threshold} if dc.embedding else {}),
                       **({"functional_candidates": dc.functional_candidates} if dc.functional else {})},
        **({"functional": scores.functional_runs} if dc.functional else {}),
        "humaneval": {"problems": len(problems),
                      "max_ast_tau": max((r["ast_tau"] for r in similarity["problems"]), default=0.0),
                      "similar_at_tau": {lvl: v["n_similar"] for lvl, v in similarity["tau_levels"].items()}},
        "tokens": {"completion_tokens": sum(int((r.get("usage") or {}).get("completion_tokens", 0)) for r in kept),
                   "text_words": sum(len(row["text"].split()) for row in rows)},
        "dataset": dataset,
    }
    # The card holds no timing: re-running gives the same bytes.
    stage_stats = {**read_stage_stats(cfg), "decontaminate": stats,
                   **({"corpus": read_corpus_stats(cfg)} if dc.card_corpus else {})}
    card = write_card(cfg, config_path, stage_stats, Path(dc.card_path))
    # The dataset folder is a complete Hugging Face dataset repo: the card's `configs` map its files.
    atomic_write_text(Path(dc.dataset_dir) / "README.md", card)
    stats["timing"] = {**timing, "wall_s": round(time.monotonic() - t0, 2)}
    DecontaminateStats.parse(stats, out_dir / "stats.json").write(out_dir / "stats.json")
    log.info("decontaminate: kept %s, removed %s (%s)", stats["kept"], stats["removed"], stats["removed_by_signal"])
    return stats


def main(args) -> int:
    return stage_cli(run_decontaminate, args, lambda stats: {
        "kept": stats["kept"], "removed": stats["removed"], "removed_by_signal": stats["removed_by_signal"]})
