"""The corpus stage's two steps and its CLI.

    textbook corpus --set corpus.step=extract     # sources -> snippets (corpus.pool_dir)
    textbook corpus --set corpus.step=select      # curated snippets -> annotated, scored, kept
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from pipeline.core.artifacts import CorpusPoolStats, CorpusSelectStats, DecontaminateStats
from pipeline.core.config import ConfigError, CorpusConfig, RunConfig, configs_dir, load_preset
from pipeline.core.records import (
    RecordError,
    atomic_writer,
    dumps,
    iter_jsonl,
    iter_sharded,
    sha256_text,
    write_jsonl,
)
from pipeline.core.schema import RECORD_FIELDS, exercise_program, require_parsed
from pipeline.core.stage import stage_cli, write_resolved_config
from pipeline.engines.embeddings import embed, load_embedder
from pipeline.engines.llm import LLMSession, RequestCache, RequestsFailed, resolve_api_key
from pipeline.engines.servers import serve
from pipeline.stages.corpus import annotate, classify
from pipeline.stages.corpus.extract import POOL_FILES, run_extract

log = logging.getLogger(__package__)

EXAMPLE_CHARS = 1200  # a top/bottom example in stats.json is cut to this many characters


def record_text(rec: dict) -> str:
    """What is rated, embedded and kept: a function's whole program (its imports, signature, docstring,
    body), a class's or a file's text."""
    p = rec["parsed"]
    return exercise_program(p).strip("\n") if rec["kind"] == "exercise" else p["text"]


def iter_curated(input_dir: Path) -> Iterator[dict]:
    """The curated snippets, exercises then textbooks, one at a time."""
    for kind, name in POOL_FILES.items():
        path = input_dir / name
        for rec in iter_jsonl(path, required=RECORD_FIELDS):
            require_parsed(rec, str(path), kind)
            yield rec


def _annotate(cfg: RunConfig, cc: CorpusConfig, root: Path, base: Path, sample: list[tuple[str, str]],
              progress: bool) -> tuple[list[dict], dict]:
    """The teacher's ratings of the sample (annotations.jsonl rows) and the annotation stats."""
    preset = load_preset(cc.teacher, root)
    template = annotate.load_template(base / cc.prompts_dir, cc.template)
    requests = annotate.build_requests(sample, cc, preset, template, cfg.seed)
    resolve_api_key(preset)  # a missing key fails here, before any work
    cache = RequestCache(cc.cache_path)
    t0 = time.monotonic()
    try:
        with LLMSession(preset, cc.client, cache, serve=lambda: serve(preset, Path("logs")), progress=progress,
                        desc="annotate", seed=cfg.seed) as session:
            outcome = session.complete(requests)
        session.raise_if_failed(lost=len(outcome.failed), total=len(requests))
    finally:
        cache.close()

    def rating(req_id: str) -> tuple[int | None, str | None]:
        res = outcome.results.get(req_id)
        if res is None:
            return None, None
        text = res.choices[0]["text"]
        return annotate.parse_score(text), text

    rows, pairs = [], []
    for i, (rid, text) in enumerate(sample):
        score, answer = rating(f"an-{rid}")
        row = {"id": rid, "score": score, "answer": answer, "chars": len(text)}
        if i < cc.agreement_repeats:
            again, answer2 = rating(f"an-{rid}-again")
            row.update(score_again=again, answer_again=answer2)
            if score is not None and again is not None:
                pairs.append((score, again))
        rows.append(row)
    scores = [r["score"] for r in rows if r["score"] is not None]
    stats = {
        "teacher": {"preset": preset.name, "identity": preset.identity()},
        "template": cc.template, "template_sha256": sha256_text((base / cc.prompts_dir / cc.template).read_text()),
        "scale": list(annotate.SCALE), "positive_score": cc.positive_score,
        "sampling": {"temperature": cc.sampling.temperature, "max_tokens": cc.sampling.max_tokens},
        "requested": len(sample), "requests": len(requests), "rated": len(scores),
        "unparsed": sum(r["answer"] is not None and r["score"] is None for r in rows),
        "failed": len(outcome.failed), "not_attempted": len(outcome.not_attempted),
        "histogram": annotate.histogram(scores),
        "positive_rate": round(sum(s >= cc.positive_score for s in scores) / len(scores), 4) if scores else None,
        "mean_score": round(float(np.mean(scores)), 3) if scores else None,
        "ledger": session.ledger_dict(), "server_start_s": round(session.server_start_s, 2),
        "wall_s": round(time.monotonic() - t0, 2),
    }
    return rows, {"annotation": stats, "self_agreement": annotate.agreement(pairs, cc.positive_score)}


def run_select(cfg: RunConfig, config_path: Path, progress: bool = True) -> dict:
    cc = cfg.corpus
    t0 = time.monotonic()
    root, base = configs_dir(config_path), config_path.resolve().parent
    in_dir, out_dir = Path(cc.input_dir), Path(cc.output_dir)
    for name in POOL_FILES.values():  # both inputs are checked before any work
        if not (in_dir / name).is_file():
            raise RecordError(f"records file not found: {in_dir / name} (run dvc.yaml's corpus_extract, dedupe_corpus and decontaminate_corpus stages first)")
    out_dir.mkdir(parents=True, exist_ok=True)
    write_resolved_config(cfg, root, "corpus", out_dir)

    # Pass 1: count, and draw the seeded sample (k texts in memory, whatever the corpus's size).
    n_total = 0

    def id_texts():
        nonlocal n_total
        for rec in iter_curated(in_dir):
            n_total += 1
            yield rec["id"], record_text(rec)

    sample = annotate.take_sample(id_texts(), cc.annotate, cfg.seed)
    if n_total < 10:
        raise ConfigError(f"corpus.input_dir: {in_dir} holds {n_total} snippets; the classifier needs at least 10")
    rows, ann_stats = _annotate(cfg, cc, root, base, sample, progress)
    write_jsonl(out_dir / "annotations.jsonl", rows)

    # The classifier, on the rated sample's embeddings.
    te = time.monotonic()
    model = load_embedder(cc.embedding_model, "corpus.embedding_model")
    load_s = time.monotonic() - te
    rated = [(rid, text, r["score"]) for (rid, text), r in zip(sample, rows, strict=True) if r["score"] is not None]
    if len(rated) < 10:
        raise ConfigError(f"corpus.annotate: only {len(rated)} of {len(sample)} ratings could be read "
                          f"(unparsed {ann_stats['annotation']['unparsed']}); see {out_dir / 'annotations.jsonl'}")
    positive = annotate.split_score([s for _, _, s in rated], cc.positive_score)
    if positive is None:
        raise ConfigError(f"corpus.annotate: all {len(rated)} ratings are {rated[0][2]}: nothing for a classifier "
                          "to learn (a larger sample, or another teacher)")
    if positive != cc.positive_score:
        log.warning("corpus.positive_score=%d puts every rating on one side (histogram %s): using %d instead",
                    cc.positive_score, ann_stats["annotation"]["histogram"], positive)
    ann_stats["annotation"]["positive_score_used"] = positive
    y = np.array([int(s >= positive) for _, _, s in rated])
    X = embed(model, [t for _, t, _ in rated])
    forest, metrics, train_rows, train_scores = classify.train(X, y, cc.trees, cc.heldout_fraction, cfg.seed,
                                                               cc.keep_fraction, cc.threshold)
    oob = {rated[i][0]: float(s) for i, s in zip(train_rows.tolist(), train_scores, strict=True)}
    metrics["embedding_model"] = cc.embedding_model
    metrics["positive_score"] = positive
    metrics["scored_out_of_bag"] = len(oob)

    # Pass 2: embed every snippet in resumable shards, score each batch.
    fingerprint = dumps({"embedding_model": cc.embedding_model, "text": "record_text-v1"})
    work = Path(cc.work_dir) / f"embed-{sha256_text(fingerprint)[:12]}"
    before = set(work.glob("shard-*.jsonl"))

    def embed_shard(shard: list[dict]) -> list[dict]:
        vectors = embed(model, [r["text"] for r in shard])
        return [{"id": r["id"], "e": classify.pack(v)} for r, v in zip(shard, vectors, strict=True)]

    items = ({"id": rec["id"], "text": record_text(rec)} for rec in iter_curated(in_dir))
    scores = np.zeros(n_total)
    ids: list[str] = []
    batch: list[dict] = []
    t_embed, score_s = time.monotonic(), 0.0

    def flush() -> None:
        nonlocal score_s
        ts = time.monotonic()
        scores[len(ids):len(ids) + len(batch)] = classify.positive_proba(forest, classify.unpack([b["e"] for b in batch]))
        score_s += time.monotonic() - ts
        ids.extend(b["id"] for b in batch)
        batch.clear()

    for row in iter_sharded(items, cc.shard_size, work, fingerprint, embed_shard, progress=progress, desc="embed",
                            total=n_total):
        batch.append(row)
        if len(batch) >= 4096:
            flush()
    if batch:
        flush()
    embed_wall = time.monotonic() - t_embed - score_s
    for i, rid in enumerate(ids):  # the snippets the forest trained on: their out-of-bag scores
        if rid in oob:
            scores[i] = oob[rid]
    reused = len(before & set(work.glob("shard-*.jsonl")))
    mask, cut = classify.keep_mask(scores, cc.keep_fraction, cc.threshold)

    # Pass 3: write the kept snippets (pretrain.extra_corpus reads their `text`) and every score.
    order = np.argsort(-scores, kind="stable")
    show = cc.examples
    top_rows = set(order[:show].tolist())
    bottom_rows = set(order[len(order) - show:].tolist()) if show else set()
    examples: dict[int, dict] = {}
    kept_chars = kept_n = 0
    kept_units: dict[str, int] = {}
    with atomic_writer(out_dir / "kept.jsonl") as kept_fh, atomic_writer(out_dir / "scores.jsonl") as score_fh:
        for i, rec in enumerate(iter_curated(in_dir)):
            if rec["id"] != ids[i]:
                raise RecordError(f"{in_dir}: changed while the stage ran (record {i} is {rec['id']}, was {ids[i]})")
            s = round(float(scores[i]), 6)
            src = rec.get("source") or {}
            score_fh.write(dumps({"id": rec["id"], "score": s, "kept": bool(mask[i])}) + "\n")
            text = record_text(rec)
            if mask[i]:
                kept_n += 1
                kept_chars += len(text)
                unit = src.get("unit", rec["kind"])
                kept_units[unit] = kept_units.get(unit, 0) + 1
                kept_fh.write(dumps({"id": rec["id"], "text": text, "score": s, "kind": rec["kind"], "unit": unit,
                                     "source": src.get("source"), "path": src.get("path")}) + "\n")
            if i in top_rows or i in bottom_rows:
                examples[i] = {"id": rec["id"], "score": s, "path": src.get("path"), "unit": src.get("unit"),
                               "text": text[:EXAMPLE_CHARS] + ("\n# ..." if len(text) > EXAMPLE_CHARS else "")}

    # What the earlier steps wrote (None where a file is missing: its counts are then unknown, not 0).
    pool = CorpusPoolStats.read_optional(Path(cc.pool_dir) / "stats.json")
    decon = DecontaminateStats.read_optional(in_dir / "stats.json")
    n_scored = len(scores)
    stats = {
        "enabled": True,
        "sources": pool.sources if pool else None,
        "counts": {"files_read": pool.files.read if pool and pool.files else None,
                   "snippets": pool.snippets_total if pool else None,
                   "after_dedupe": decon.in_.total if decon else None, "after_decontaminate": n_total,
                   "annotated": ann_stats["annotation"]["rated"], "scored": n_scored, "kept": kept_n},
        "snippets_by_unit": pool.snippets if pool else None,
        **ann_stats,
        "classifier": metrics,
        "selection": {"rule": "threshold" if cc.threshold > 0 else "keep_fraction", "keep_fraction": cc.keep_fraction,
                      "threshold": cc.threshold, "lowest_kept_score": round(cut, 6) if kept_n else None,
                      "kept": kept_n, "kept_fraction": round(kept_n / n_scored, 4) if n_scored else 0.0,
                      "kept_by_unit": dict(sorted(kept_units.items())), "kept_chars": kept_chars,
                      "mean_score": round(float(scores.mean()), 4) if n_scored else None,
                      "output": str(out_dir / "kept.jsonl")},
        "examples": {"top": [examples[i] for i in order[:show].tolist()],
                     "bottom": [examples[i] for i in order[len(order) - show:].tolist()[::-1]] if show else []},
        "timing": {"wall_s": round(time.monotonic() - t0, 2), "annotate_s": ann_stats["annotation"]["wall_s"],
                   "embedder_load_s": round(load_s, 2), "embed_s": round(embed_wall, 2),
                   "embed_per_s": round(n_total / max(embed_wall, 1e-9), 1), "score_s": round(score_s, 4),
                   "score_per_s": round(n_total / max(score_s, 1e-9), 1), "shards_reused": reused},
    }
    model = CorpusSelectStats.parse(stats, out_dir / "stats.json")
    model.write(out_dir / "stats.json")
    log.info("corpus: kept %d of %d snippets (held out: ROC AUC %s; the kept share's precision %s, recall %s, "
             "lift %s)", kept_n, n_scored, metrics["roc_auc"], metrics["precision_at_keep"], metrics["recall_at_keep"],
             metrics["lift_at_keep"])
    return model.dump()


def disabled(cfg: RunConfig, config_path: Path) -> dict:
    """`corpus.enabled: false`: the step's declared outputs, empty, in a moment (as pretrain's when it is off).
    Extract writes an empty pool, so dedupe and decontaminate run on nothing; select writes an empty kept.jsonl,
    so pretrain.extra_corpus reads no document."""
    cc = cfg.corpus
    out_dir = Path(cc.pool_dir if cc.step == "extract" else cc.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_resolved_config(cfg, configs_dir(config_path), "corpus", out_dir)
    names = POOL_FILES.values() if cc.step == "extract" else ("kept.jsonl", "scores.jsonl", "annotations.jsonl")
    for name in names:
        write_jsonl(out_dir / name, [])
    stats = {"enabled": False}
    model = CorpusPoolStats if cc.step == "extract" else CorpusSelectStats
    model.parse(stats, out_dir / "stats.json").write(out_dir / "stats.json")
    log.info("corpus: corpus.enabled is false: %s written empty", out_dir)
    return stats


def run_corpus(cfg: RunConfig, config_path: Path, progress: bool = True) -> dict:
    """The stage's core: the configured step; returns its stats (also in its stats.json)."""
    cc = cfg.corpus
    if not cc.enabled:
        return {"step": cc.step, **disabled(cfg, config_path)}
    if cc.step == "extract":
        Path(cc.pool_dir).mkdir(parents=True, exist_ok=True)
        write_resolved_config(cfg, configs_dir(config_path), "corpus", Path(cc.pool_dir))
        return {"step": "extract", **run_extract(cc, progress)}
    return {"step": "select", **run_select(cfg, config_path, progress)}


def summary(stats: dict) -> dict:
    if stats.get("enabled") is False:
        return {"step": stats["step"], "enabled": False}
    if stats["step"] == "extract":
        return {"step": "extract", "files": stats["files"]["read"], "snippets": stats["snippets"]}
    return {"step": "select", **{k: stats["counts"][k] for k in ("after_decontaminate", "annotated", "kept")},
            **{k: stats["classifier"][k] for k in ("roc_auc", "precision_at_keep", "recall_at_keep", "lift_at_keep")},
            "self_agreement": stats["self_agreement"].get("exact")}


def main(args) -> int:
    return stage_cli(run_corpus, args, summary, {RequestsFailed: ("teacher requests failed", 3)})
