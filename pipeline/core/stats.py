"""Every curation stage's stats.json, read back through its model (pipeline.core.artifacts): where each upstream
stage wrote it, and the funnel row (in / kept / removed and why) that the dataset card and the report both show.

    python -c "from pipeline.core.config import load_config; from pipeline.core.stats import *; \
print([funnel_row(s, st) for s, st in read_stage_stats(load_config()).items()])"
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Union

from pipeline.core.artifacts import DecontaminateStats, DedupeStats, FilterStats, GenerateStats
from pipeline.core.config import RunConfig

log = logging.getLogger(__name__)

STAGE_ORDER = ("generate", "filter", "dedupe", "decontaminate")
STAGE_MODELS = {"generate": GenerateStats, "filter": FilterStats, "dedupe": DedupeStats,
                "decontaminate": DecontaminateStats}
StageStats = Union[GenerateStats, FilterStats, DedupeStats, DecontaminateStats]  # noqa: UP007


def stage_stats_paths(cfg: RunConfig) -> dict[str, Path]:
    """Where each upstream stage writes stats.json, from the config (the filter stage's output is dedupe's input)."""
    filter_cfg = getattr(cfg, "filter", None)
    filter_dir = getattr(filter_cfg, "output_dir", None) or cfg.dedupe.input_dir
    dirs = {"generate": cfg.generate.output_dir, "filter": filter_dir, "dedupe": cfg.dedupe.output_dir}
    out: dict[str, Path] = {}
    for stage, folder in dirs.items():
        if Path(folder) not in {p.parent for p in out.values()}:  # a skipped stage points at an earlier one's folder
            out[stage] = Path(folder) / "stats.json"
    return out


def read_stage_stats(cfg: RunConfig) -> dict[str, StageStats | None]:
    """Each upstream stage's stats, None for a stage that has not run; a corrupt file, or one with a key its
    stage does not write, is an ArtifactError (a RecordError) naming it."""
    out: dict[str, StageStats | None] = {stage: None for stage in STAGE_ORDER[:-1]}
    for stage, path in stage_stats_paths(cfg).items():
        if not path.is_file():
            log.info("card: no %s (stage %s not run)", path, stage)
            continue
        out[stage] = STAGE_MODELS[stage].read(path)
    return out


def stage_stats(stage: str, stats: StageStats | Mapping | None) -> StageStats | None:
    """A stage's stats as its model: a producer's own dict (a stage handing its stats on before it writes them)
    is parsed, so a key its model does not know is an error here too."""
    if stats is None or isinstance(stats, STAGE_MODELS[stage]):
        return stats
    return STAGE_MODELS[stage].parse(stats, f"{stage} stats")


def funnel_row(stage: str, stats: StageStats | Mapping | None) -> dict:
    """in / kept / removed of one stage and why (its model's `funnel()`); generate's 'in' is the requests sent."""
    model = stage_stats(stage, stats)
    if model is None:
        return {"stage": stage, "status": "not run"}
    return {"stage": stage, "status": "ran", **model.funnel()}
