"""The report's inputs, each read through its model (pipeline.core.artifacts) and each optional: a file that is
missing, not JSON, or not what its producer writes (the error names the file and the key) is named "not available"
in the report, never a crash.

    python -c "from pipeline.core.config import load_config; from pipeline.stages.report.inputs import read_inputs; \
print(read_inputs(load_config()).missing)"
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path

from pipeline.core.artifacts import (
    ArtifactError,
    CorpusSelectStats,
    DecontaminateStats,
    EvalMetrics,
    FinetuneMetrics,
    HumanEvalSimilarity,
    PerProblem,
)
from pipeline.core.artifacts.base import ArtifactIO
from pipeline.core.config import RunConfig
from pipeline.core.corpus_stats import corpus_stats_path
from pipeline.core.stats import STAGE_ORDER, StageStats, read_stage_stats

log = logging.getLogger(__name__)


@dataclass
class Inputs:
    metrics: EvalMetrics | None
    per_problem: PerProblem | None
    finetune: FinetuneMetrics | None
    similarity: HumanEvalSimilarity | None
    stages: dict[str, StageStats | None]
    corpus: CorpusSelectStats | None
    curves: dict[str, list[tuple[float, float]]]
    missing: list[str]


def read_artifact(model: type[ArtifactIO], path: Path, missing: list[str]):
    """The artifact, or None (named in `missing`) when absent or unreadable: the report never crashes on input."""
    if not path.is_file():
        missing.append(f"{path} (not found)")
        return None
    try:
        return model.read(path)
    except ArtifactError as exc:
        log.warning("report: %s", exc)
        missing.append(str(exc).replace(f"{path}: ", f"{path} (", 1) + ")")
        return None


def read_curve(path: Path) -> list[tuple[float, float]]:
    """(step, value) rows of a dvclive metric tsv (columns [timestamp,] step, <metric>)."""
    with path.open(encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh, delimiter="\t")
        cols = [c for c in (reader.fieldnames or []) if c not in ("timestamp", "step")]
        if "step" not in (reader.fieldnames or []) or not cols:
            return []
        rows = []
        for row in reader:
            try:
                rows.append((float(row["step"]), float(row[cols[-1]])))
            except (TypeError, ValueError):
                continue
        return rows


def curve_paths(finetune_dir: Path) -> dict[str, Path]:
    base = finetune_dir / "dvclive" / "plots" / "metrics"
    return {"train loss": base / "train" / "loss.tsv", "eval loss": base / "eval" / "loss.tsv"}


def read_inputs(cfg: RunConfig) -> Inputs:
    missing: list[str] = []
    ev_dir, ft_dir, dc_dir = Path(cfg.evaluate.output_dir), Path(cfg.finetune.output_dir), Path(cfg.decontaminate.output_dir)
    metrics = read_artifact(EvalMetrics, ev_dir / "metrics.json", missing)
    per_problem = read_artifact(PerProblem, ev_dir / "per_problem.json", missing)
    finetune = read_artifact(FinetuneMetrics, ft_dir / "metrics.json", missing)
    similarity = read_artifact(HumanEvalSimilarity, dc_dir / "humaneval_similarity.json", missing)
    try:
        stages: dict[str, StageStats | None] = dict(read_stage_stats(cfg))
    except ArtifactError as exc:  # a corrupt upstream stats file: named, not fatal, in a report
        log.warning("report: stage stats unreadable: %s", exc)
        missing.append(f"stage stats ({exc})")
        stages = {s: None for s in STAGE_ORDER[:-1]}
    stages["decontaminate"] = read_artifact(DecontaminateStats, dc_dir / "stats.json", missing)
    corpus_path = corpus_stats_path(cfg)
    corpus = read_artifact(CorpusSelectStats, corpus_path, missing) if corpus_path.is_file() else None
    missing += [f"{s} stats.json (stage not run)" for s in STAGE_ORDER[:-1] if stages.get(s) is None]
    curves = {}
    for name, path in curve_paths(ft_dir).items():
        if path.is_file():
            curves[name] = read_curve(path)
        elif name == "train loss":
            missing.append(f"{path} (not found)")
    return Inputs(metrics, per_problem, finetune, similarity, stages, corpus, curves, missing)
