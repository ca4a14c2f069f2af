"""Every stage's stats.json, read back: where each upstream stage wrote it, and the funnel row
(in / kept / removed and why) that the dataset card and the report both show.

    python -c "from pipeline.core.config import load_config; from pipeline.core.stats import *; \
print([funnel_row(s, st) for s, st in read_stage_stats(load_config()).items()])"
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipeline.core.config import RunConfig
from pipeline.core.records import RecordError
from pipeline.core.schema import KINDS

log = logging.getLogger(__name__)

STAGE_ORDER = ("generate", "filter", "dedupe", "decontaminate")


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


def read_stage_stats(cfg: RunConfig) -> dict[str, dict | None]:
    """Each upstream stage's stats, None for a stage that has not run; a corrupt file is an error."""
    out: dict[str, dict | None] = {stage: None for stage in STAGE_ORDER[:-1]}
    for stage, path in stage_stats_paths(cfg).items():
        if not path.is_file():
            log.info("card: no %s (stage %s not run)", path, stage)
            continue
        out[stage] = read_stats_file(path)
    return out


def read_stats_file(path: Path) -> dict | None:
    """A stage's stats.json, None when it is missing; a corrupt file is an error naming it."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RecordError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise RecordError(f"{path}: stats must be a JSON object")
    return data


# Reading stats of any stage: tolerant of schemas still settling.


def total(value: Any) -> int | None:
    """An int, or the sum of a per-kind mapping of ints; None when absent."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, Mapping):
        parts = [total(v) for v in value.values()]
        return sum(p for p in parts if p is not None) if any(p is not None for p in parts) else None
    return None


def breakdown(stats: Mapping) -> dict[str, int]:
    """Every `*_by_reason`, `*_by_signal`, `*_by_method` mapping, flattened to {reason: n}."""
    out: dict[str, int] = {}
    for key in sorted(stats):
        if key.endswith(("by_reason", "by_signal", "by_method")) and isinstance(stats[key], Mapping):
            for reason, n in sorted(stats[key].items()):
                if total(n) is not None:
                    out[str(reason)] = total(n)
    return out


def kind_sections(stats: Mapping) -> dict[str, Mapping]:
    """Per-kind sub-stats ({"exercise": {in, kept, ...}, "textbook": {...}}), as filter and dedupe write them."""
    return {k: v for k, v in stats.items() if k in KINDS and isinstance(v, Mapping) and "in" in v}


def _count(stats: Mapping, sections: Mapping[str, Mapping], *keys: str) -> int | None:
    """The first of `keys` found at the top level (an int or per-kind ints), else summed over the kind sections."""
    for key in keys:
        if total(stats.get(key)) is not None:
            return total(stats[key])
    for key in keys:
        parts = [total(sec.get(key)) for sec in sections.values()]
        if any(p is not None for p in parts):
            return sum(p for p in parts if p is not None)
    return None


def funnel_row(stage: str, stats: Mapping | None) -> dict:
    """in / kept / removed of one stage and why, whatever the layout of its stats (totals at the top
    level, per-kind mappings, or per-kind sections); generate's 'in' is the requests sent."""
    if stats is None:
        return {"stage": stage, "status": "not run"}
    sections = kind_sections(stats)
    n_in = _count(stats, sections, "requested" if stage == "generate" else "in")
    kept = _count(stats, sections, "kept")
    removed = _count(stats, sections, "removed", "dropped", "rejected")
    if removed is None and n_in is not None and kept is not None:
        removed = n_in - kept
    reasons: dict[str, int] = {}
    for part in (stats, *sections.values()):
        for reason, n in breakdown(part).items():
            reasons[reason] = reasons.get(reason, 0) + n
    for sec in sections.values():  # dedupe: removed_exact, removed_near
        for key, n in sec.items():
            if key.startswith("removed_") and total(n) is not None:
                reasons[key.removeprefix("removed_")] = reasons.get(key.removeprefix("removed_"), 0) + total(n)
    if stage == "generate" and stats.get("not_attempted"):
        reasons["not_attempted (budget)"] = int(stats["not_attempted"])
    if stage == "generate" and stats.get("lost"):  # transport failures accepted by client.max_failed_fraction
        reasons["lost (request failed, accepted by client.max_failed_fraction)"] = int(stats["lost"])
    by_kind = stats.get("kept") if isinstance(stats.get("kept"), Mapping) else (
        {k: sec.get("kept") for k, sec in sections.items()} or None)
    return {"stage": stage, "status": "ran", "in": n_in, "kept": kept, "removed": removed,
            "reasons": dict(sorted(reasons.items())), "kept_by_kind": by_kind}
