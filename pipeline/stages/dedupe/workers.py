"""Worker processes: a pool that maps tasks in order, and pass 2's task that re-reads records.

Workers are spawned: call `run_dedupe` from a script only under ``if __name__ == "__main__":``.
Pass 2 holds no text from pass 1, only offsets: the exact keys, shingle sets or signatures of
the records it needs are recomputed from the input in the workers (recompute_task).
"""

from __future__ import annotations

import json
import multiprocessing
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np

from pipeline.stages.dedupe.minhash import BATCH_DOCS, MinHasher, shingle_hashes
from pipeline.stages.dedupe.normalize import exact_key, raw_tokens, record_text


def recompute_task(task: tuple[str, str, Path, int, np.ndarray, np.ndarray, MinHasher | None]) -> object:
    """For the records at (offsets, lengths), in order: their exact keys (what="exact": the keys
    joined as bytes, and whether each parsed), their sorted shingle sets (what="shingles", a list)
    or their MinHash signatures (what="signatures", the hasher's as in pass 1: one matrix)."""
    what, kind, path, k, offsets, lengths, hasher = task
    texts = []
    with path.open("rb") as fh:
        for offset, length in zip(offsets.tolist(), lengths.tolist(), strict=True):
            fh.seek(offset)
            texts.append(record_text(kind, json.loads(fh.read(length))["parsed"]))
    if what == "exact":
        keys = [exact_key(kind, t) for t in texts]
        return b"".join(key for key, _ in keys), np.array([ok for _, ok in keys], bool)
    out = []
    for lo in range(0, len(texts), BATCH_DOCS):
        hashes, counts = shingle_hashes([raw_tokens(kind, t) for t in texts[lo: lo + BATCH_DOCS]], k)
        if what == "signatures":
            out.append(hasher.signatures(hashes, counts))
        else:
            out.extend(np.unique(h) for h in np.split(hashes, np.cumsum(counts)[:-1]))
    if what == "signatures":
        return np.concatenate(out) if out else np.empty((0, hasher.num_perm), np.uint32)
    return out


class Workers:
    """Maps tasks in order over a process pool, or in this process when there is one task or core."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._pool: multiprocessing.pool.Pool | None = None

    def imap(self, fn: Callable, tasks: Iterable, count: int) -> Iterator:
        """fn over `count` tasks, in order; a pool takes a generator's tasks as it needs them."""
        if self.workers <= 1 or count <= 1:
            return map(fn, tasks)
        if self._pool is None:
            # spawn: workers start clean (no inherited threads or locks), the same on every OS.
            self._pool = multiprocessing.get_context("spawn").Pool(self.workers)
        return self._pool.imap(fn, tasks)

    @property
    def used(self) -> int:
        """Processes that did the work: the pool's, or this one."""
        return self.workers if self._pool is not None else 1

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, exc_type: type | None, *_: object) -> None:
        if self._pool is None:
            return
        if exc_type is None:
            self._pool.close()
        else:  # a bad record: do not let the queued blocks run on
            self._pool.terminate()
        self._pool.join()


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
