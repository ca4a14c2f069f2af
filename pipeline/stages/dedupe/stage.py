"""The dedupe stage: index both inputs, decide, write the outputs and stats.json; its CLI.

Work in progress lives in ``output_dir/.shards`` (indexed blocks and confirmation steps,
which a killed run reads back) and is deleted once the outputs are written; stats.json's
``timing.resumed`` says how much a killed run's shards saved. Kept records are copied from
the input by offset.

    textbook dedupe -q --set dedupe.workers=2
"""

from __future__ import annotations

import contextlib
import heapq
import json
import logging
import os
import shutil
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pipeline.core.artifacts import DedupeStats
from pipeline.core.config import RunConfig, configs_dir
from pipeline.core.records import RecordError, atomic_writer, dumps
from pipeline.core.schema import KIND_FILES, KINDS
from pipeline.core.stage import stage_cli, write_resolved_config
from pipeline.stages.dedupe.decide import Outcome, decide_kind
from pipeline.stages.dedupe.index import Index, Params, index_file
from pipeline.stages.dedupe.lsh import candidate_probability, lsh_params
from pipeline.stages.dedupe.minhash import MinHasher
from pipeline.stages.dedupe.workers import Workers, cores

log = logging.getLogger(__package__)  # pipeline.stages.dedupe, as before the package was split

INPUT_FILES = KIND_FILES
REMOVED_FILE = "removed.jsonl"
SHARDS_DIR = ".shards"  # work in progress, under output_dir: what a killed run resumes from


def _lines(fd: int, index: Index, rows: Iterable[int]) -> Iterator[tuple[int, str]]:
    """(row, line) read by offset; pread rather than mmap, so page cache is not counted in our RSS."""
    for r in rows:
        yield r, os.pread(fd, int(index.lengths[r]), int(index.offsets[r])).decode("utf-8")


def _kept_lines(fd: int, index: Index, outcome: Outcome) -> Iterator[str]:
    """Kept records in id order: the input line itself when already canonical (the usual case)."""
    kept = np.flatnonzero(outcome.survivor == np.arange(len(index.ids))).tolist()
    for r, line in _lines(fd, index, kept):
        yield (line if index.canonical[r] else dumps(json.loads(line))) + "\n"


def _removed_lines(fd: int, index: Index, outcome: Outcome) -> Iterator[tuple[str, str]]:
    """(id, line) of removed records in id order, each naming the record it duplicates."""
    removed = np.flatnonzero(outcome.survivor != np.arange(len(index.ids))).tolist()
    for r, line in _lines(fd, index, removed):
        exact = bool(outcome.exact[r])
        rec = {**json.loads(line), "duplicate_of": index.id(int(outcome.survivor[r])),
               "kind_of_duplicate": "exact" if exact else "near",
               "jaccard": 1.0 if exact else round(outcome.jaccard[r], 6)}
        yield index.id(r), dumps(rec) + "\n"


def _write_outputs(out_dir: Path, paths: dict[str, Path], indexes: dict[str, Index],
                   outcomes: dict[str, Outcome], progress: bool) -> None:
    total = sum(len(i.ids) for i in indexes.values())
    with contextlib.ExitStack() as stack, tqdm(total=total, desc="write", unit="rec", disable=not progress,
                                               mininterval=0.5) as bar:
        fds = {kind: stack.enter_context(paths[kind].open("rb")).fileno() for kind in KINDS}
        for kind in KINDS:
            with atomic_writer(out_dir / INPUT_FILES[kind]) as fh:
                for line in _kept_lines(fds[kind], indexes[kind], outcomes[kind]):
                    fh.write(line)
                    bar.update(1)
        with atomic_writer(out_dir / REMOVED_FILE) as fh:
            streams = [_removed_lines(fds[kind], indexes[kind], outcomes[kind]) for kind in KINDS]
            for _, line in heapq.merge(*streams, key=lambda item: item[0]):
                fh.write(line)
                bar.update(1)


def run_dedupe(cfg: RunConfig, config_path: Path, progress: bool = True) -> dict:
    """The stage's core: returns its stats (also written to stats.json).

    Work in progress lives in ``output_dir/.shards`` (indexed blocks and confirmation steps,
    which a killed run reads back; band hashes and crowded rows' signatures, scratch) and is
    deleted once the outputs are written."""
    dd = cfg.dedupe
    paths = {kind: Path(dd.input_dir) / INPUT_FILES[kind] for kind in KINDS}
    for path in paths.values():  # both inputs are checked before any work
        if not path.is_file():
            raise RecordError(f"records file not found: {path}")
    out_dir = Path(dd.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_resolved_config(cfg, configs_dir(config_path), "dedupe", out_dir)
    bands, rows = lsh_params(dd.threshold, dd.num_perm, dd.candidate_recall)
    hasher = MinHasher(bands * rows, cfg.seed)  # permutations beyond bands*rows would go unused
    t0 = time.monotonic()
    indexes, outcomes, works = {}, {}, {}
    with Workers(dd.workers or cores()) as workers:
        for kind in KINDS:
            params = Params(kind, dd.exact, dd.near, dd.shingle_size, bands, rows, hasher)
            works[kind] = out_dir / SHARDS_DIR / f"{kind}-{params.fingerprint()}"
            indexes[kind] = index_file(kind, paths[kind], params, workers, works[kind], dd.shard_bytes, progress)
        t_index = time.monotonic()
        for kind in KINDS:
            outcomes[kind] = decide_kind(kind, paths[kind], indexes[kind], dd, hasher, workers, works[kind],
                                         progress)
    t_decide = time.monotonic()
    _write_outputs(out_dir, paths, indexes, outcomes, progress)
    shutil.rmtree(out_dir / SHARDS_DIR, ignore_errors=True)  # finished: the shards have served their purpose
    wall = time.monotonic() - t0
    n_docs = sum(len(i.ids) for i in indexes.values())
    stats = {
        **{kind: outcomes[kind].stats for kind in KINDS},
        "kept": {kind: outcomes[kind].stats["kept"] for kind in KINDS},
        "removed": {kind: outcomes[kind].stats["in"] - outcomes[kind].stats["kept"] for kind in KINDS},
        "lsh": {"num_perm": dd.num_perm, "permutations_used": bands * rows, "bands": bands, "rows": rows,
                "threshold": dd.threshold,
                "candidate_recall": dd.candidate_recall,
                "p_candidate_at_threshold": round(candidate_probability(dd.threshold, bands, rows), 4),
                "shingle_size": dd.shingle_size, "exact": dd.exact, "near": dd.near},
        "timing": {"wall_s": round(wall, 3), "index_s": round(t_index - t0, 3),
                   "decide_s": round(t_decide - t_index, 3), "write_s": round(time.monotonic() - t_decide, 3),
                   "docs_per_s": round(n_docs / max(wall, 1e-9), 1), "workers": workers.used,
                   # How much a killed run's shards saved this one (0 on a clean run).
                   "resumed": {kind: outcomes[kind].resumed for kind in KINDS}},
    }
    DedupeStats.parse(stats, out_dir / "stats.json").write(out_dir / "stats.json")
    log.info("dedupe: kept %s, removed %s (bands=%d rows=%d) in %.1fs",
             stats["kept"], stats["removed"], bands, rows, wall)
    return stats


def main(args) -> int:
    return stage_cli(run_dedupe, args, lambda stats: {"kept": stats["kept"], "removed": stats["removed"],
                                                      "bands": stats["lsh"]["bands"], "rows": stats["lsh"]["rows"]})
