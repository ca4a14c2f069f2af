"""Pass 2, deciding: exact groups, LSH candidates, confirmation by true Jaccard, survivors.

Only exercises sharing a screen key are parsed for their exact key. Every candidate pair is
confirmed by the true Jaccard of the two shingle sets, recomputed from the input
CONFIRM_PAIRS pairs at a time so memory does not grow with the candidates; each finished step
is saved under the hash of the whole index and of its pairs, so a killed run resumes at the
step it was in. In id order, a record confirmed against a lower kept record is removed as its
duplicate, so every removal is at or above the threshold with the record kept in its place.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pipeline.core.config import DedupeConfig
from pipeline.stages.dedupe.index import Columns, Index, save_atomically
from pipeline.stages.dedupe.lsh import lsh_candidates, residual_pairs, unique_pairs
from pipeline.stages.dedupe.minhash import MinHasher, jaccard
from pipeline.stages.dedupe.workers import Workers, recompute_task

CONFIRM_PAIRS = 100_000  # candidate pairs confirmed per step: at most twice as many shingle sets held
SPANS_PER_TASK = 2048  # records per task of pass 2 (AST keys, shingle sets of candidates)


@dataclass
class Outcome:
    survivor: np.ndarray  # row of the record each row's cluster keeps (itself if kept)
    exact: np.ndarray  # bool per row: removed as an exact duplicate of its survivor
    jaccard: dict[int, float]  # removed near-duplicate row -> true Jaccard with its survivor
    stats: dict
    resumed: dict  # blocks and confirmation steps read back from a killed run's shards


def _survivors(n: int, pairs: np.ndarray) -> np.ndarray:
    """Each row's survivor over the confirmed edges `pairs` (i < j): in id order, a row with a
    confirmed edge to a lower row that is kept is removed as that row's duplicate (the lowest
    such), else kept.

    Why not union-find's components: a chain A~B~C joins C to A although A and C may be under
    the threshold; here every removed row is at or above the threshold with the record kept in
    its place, so every removal is confirmed. Only the rows in some pair enter the loop."""
    survivor = np.arange(n)
    if len(pairs) == 0:
        return survivor
    nodes, local = np.unique(pairs, return_inverse=True)  # ascending: local order is row order
    local = local.reshape(pairs.shape)
    by_high = local[np.lexsort((local[:, 0], local[:, 1]))]  # by j, then i: a row's lower rows are decided
    kept = list(range(len(nodes)))
    for i, j in by_high.tolist():
        if kept[j] == j and kept[i] == i:
            kept[j] = i
    survivor[nodes] = nodes[kept]
    return survivor


def recompute(what: str, kind: str, path: Path, index: Index, rows: np.ndarray, k: int,
              workers: Workers, hasher: MinHasher | None = None) -> Iterator:
    """recompute_task's results for `rows`, SPANS_PER_TASK rows a task, in order, re-read from the
    input by the workers. Tasks are made as the pool takes them: nothing grows with `rows`."""
    tasks = ((what, kind, path, k, index.offsets[rows[lo: lo + SPANS_PER_TASK]],
              index.lengths[rows[lo: lo + SPANS_PER_TASK]], hasher) for lo in range(0, len(rows), SPANS_PER_TASK))
    return workers.imap(recompute_task, tasks, -(-len(rows) // SPANS_PER_TASK))


def _exact_groups(kind: str, path: Path, index: Index, workers: Workers) -> tuple[np.ndarray, dict]:
    """(each row's exact representative: the lowest row with its exact key; stats).

    Exercises sharing a screen key get their AST key; the others' screen keys stay, and are
    unique. index.keys then holds the exact keys."""
    stats = {"ast_checked": 0, "unparsable_code": 0}
    if kind == "exercise":
        _, inverse, counts = np.unique(index.keys, return_inverse=True, return_counts=True)
        shared = np.flatnonzero(counts[inverse.ravel()] > 1)
        del inverse, counts
        unparsable, lo = 0, 0
        for keys, parsed in recompute("exact", kind, path, index, shared, 0, workers):
            index.keys[shared[lo: lo + len(parsed)]] = np.frombuffer(keys, "S16")
            unparsable += int((~parsed).sum())
            lo += len(parsed)
        stats = {"ast_checked": len(shared), "unparsable_code": unparsable}
    # np.unique's first occurrence is the lowest id: rows are sorted by id.
    _, first, inverse = np.unique(index.keys, return_index=True, return_inverse=True)
    return first[inverse.ravel()], stats


def _checkpointed(path: Path, compute: Callable[[], np.ndarray]) -> tuple[np.ndarray, bool]:
    """(compute()'s array, whether it was read back from `path`, where a previous run saved it)."""
    if path.is_file():
        return np.load(path), True
    value = compute()
    save_atomically(path, lambda fh: np.save(fh, value))
    return value, False


def _jaccards(kind: str, path: Path, index: Index, pairs: np.ndarray, k: int, workers: Workers,
              work: Path, bar: tqdm) -> tuple[np.ndarray, int]:
    """(true Jaccard of each pair, steps read back from a killed run), CONFIRM_PAIRS at a time:
    only one step's shingle sets (recomputed from the input by the workers) are held, whatever
    the number of candidates. Each finished step is saved under the input's digest and its
    pairs' hash, so a killed run resumes at the step it was in."""
    sims = np.empty(len(pairs), float)
    reused = 0
    for lo in range(0, len(pairs), CONFIRM_PAIRS):
        step = pairs[lo: lo + CONFIRM_PAIRS]

        def confirm(step: np.ndarray = step) -> np.ndarray:
            docs = np.unique(step)
            sets = dict(zip(docs.tolist(), itertools.chain.from_iterable(
                recompute("shingles", kind, path, index, docs, k, workers)), strict=True))
            return np.array([jaccard(sets[i], sets[j]) for i, j in step.tolist()], float)

        name = hashlib.blake2b(step.tobytes(), digest_size=8).hexdigest()
        sims[lo: lo + len(step)], was_saved = _checkpointed(
            work / f"confirm-{index.digest}" / f"step-{lo // CONFIRM_PAIRS:06d}-{name}.npy", confirm)
        reused += was_saved
        bar.update(len(step))
    return sims, reused


def _crowded_signatures(kind: str, path: Path, index: Index, rows: np.ndarray, k: int, hasher: MinHasher,
                        workers: Workers, work: Path) -> Columns:
    """The MinHash signatures of `rows`, recomputed by the workers and kept on disk by position."""
    store = Columns(work / "crowded-signatures", hasher.num_perm, np.uint32)
    for sig in recompute("signatures", kind, path, index, rows, k, workers, hasher):
        store.append(sig)
    store.close()
    return store


def _near_clusters(kind: str, path: Path, index: Index, rep: np.ndarray, dd: DedupeConfig, hasher: MinHasher,
                   workers: Workers, work: Path, progress: bool) -> tuple[np.ndarray, dict[int, float], dict]:
    """(each row's survivor, true Jaccard of each near-removed row with it, stats): LSH candidates
    among exact representatives (plus residual pairs among the rows of crowded buckets, from
    their recomputed signatures), confirmed by true Jaccard, survivors in id order (_survivors)."""
    n = len(index.ids)
    eligible = np.flatnonzero((rep == np.arange(n)) & (index.counts > 0))
    found, crowded = lsh_candidates(index.bands(eligible))
    found = [found]
    crowded_rows = np.flatnonzero(crowded)
    del crowded
    if len(crowded_rows) > 1:
        sig = _crowded_signatures(kind, path, index, eligible[crowded_rows], dd.shingle_size, hasher, workers, work)
        found.append(crowded_rows[residual_pairs(sig.columns())])
    pairs = eligible[unique_pairs(found, len(eligible))]  # sorted: eligible ascends
    del found
    with tqdm(total=len(pairs), desc=f"confirm {kind}", unit="pair", disable=not progress, mininterval=0.5) as bar:
        sims, reused = _jaccards(kind, path, index, pairs, dd.shingle_size, workers, work, bar)
        keep = sims >= dd.threshold
        confirmed, confirmed_sims = pairs[keep], sims[keep]
    del pairs, sims
    survivor = _survivors(n, confirmed)[rep]
    # A removed row's Jaccard with its survivor is their confirmed pair's (confirmed is sorted).
    removed = np.flatnonzero(survivor != rep)
    at = np.searchsorted(confirmed[:, 0] * n + confirmed[:, 1], survivor[removed] * n + rep[removed])
    jaccards = dict(zip(removed.tolist(), confirmed_sims[at].tolist(), strict=True))
    return survivor, jaccards, {"candidate_pairs": int(keep.size), "confirmed_pairs": len(confirmed),
                                "crowded_rows": len(crowded_rows), "confirm_steps_reused": reused}


def decide_kind(kind: str, path: Path, index: Index, dd: DedupeConfig, hasher: MinHasher, workers: Workers,
                work: Path, progress: bool) -> Outcome:
    """Which of one kind's records are kept, and what each removed one duplicates (exact groups first,
    then near clusters among their representatives), with the kind's stats."""
    n = len(index.ids)
    rows = np.arange(n)
    rep, stats = rows, {"ast_checked": 0, "unparsable_code": 0}
    if dd.exact and n:
        rep, stats = _exact_groups(kind, path, index, workers)
    survivor, jaccards = rep, {}
    stats.update({"candidate_pairs": 0, "confirmed_pairs": 0, "crowded_rows": 0})
    reused = 0
    if dd.near and n:
        survivor, jaccards, near_stats = _near_clusters(kind, path, index, rep, dd, hasher, workers, work, progress)
        reused = near_stats.pop("confirm_steps_reused")
        stats.update(near_stats)
    removed = survivor != rows
    exact = removed & (index.keys == index.keys[survivor]) if dd.exact else np.zeros(n, bool)
    sizes = np.bincount(survivor[removed], minlength=n) + 1  # members per survivor
    stats.update({
        "in": n, "kept": int(n - removed.sum()), "removed_exact": int(exact.sum()),
        "removed_near": int((removed & ~exact).sum()), "clusters": int((sizes > 1).sum()),
        "largest_cluster": int(sizes.max()) if n else 0,
        "without_shingles": int((index.counts == 0).sum()) if dd.near else 0,
        # Diversity as the run goes on: the share removed in each block of 1,000 records in id
        # (= generation) order; a rising curve means the prompt space is running out.
        "duplicate_rate_per_1000": [round(float(removed[i:i + 1000].mean()), 4) for i in range(0, n, 1000)],
    })
    return Outcome(survivor, exact, jaccards, stats, {"blocks": index.blocks, "blocks_reused": index.reused_blocks,
                                                       "confirm_steps_reused": reused})
