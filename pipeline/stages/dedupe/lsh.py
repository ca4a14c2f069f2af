"""LSH: bands and rows, band hashes, and candidate pairs found by sorting band hashes.

Bands and rows are the fewest-false-positive choice that makes a pair at the threshold a
candidate with probability ``dedupe.candidate_recall`` (0.99): lsh_params. Candidate buckets
come from sorting band hashes, one band at a time, never from comparing all pairs; rows of
crowded buckets (boilerplate) are also paired by the signature values they share with few
others (residual_pairs). Not datasketch: 23x faster than MinHashLSH
(bench/dedupe.py --compare-datasketch).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from pipeline.stages.dedupe.minhash import SHINGLE_BASE, U64, mix64

ALL_PAIRS_BUCKET = 16  # LSH buckets up to this size yield all pairs; bigger ones a star and a chain


def optimal_bands(threshold: float, num_perm: int, false_positive_weight: float = 0.5,
                  false_negative_weight: float = 0.5) -> tuple[int, int]:
    """(bands, rows) with bands*rows <= num_perm minimising the weighted false positive and
    false negative areas of the S-curve 1-(1-s^r)^b, as datasketch's ``_optimal_param``
    (same search order, so ties resolve alike), integrated with composite Gauss-Legendre."""
    pairs = np.array([(b, r) for b in range(1, num_perm + 1) for r in range(1, num_perm // b + 1)], float)
    b, r = pairs[:, :1], pairs[:, 1:]
    nodes, weights = np.polynomial.legendre.leggauss(8)

    def area(lo: float, hi: float) -> np.ndarray:
        """Integral of the probability of becoming candidates over [lo, hi], for every (b, r)."""
        if hi <= lo:
            return np.zeros(len(pairs))
        edges = np.linspace(lo, hi, 65)
        half = (edges[1:] - edges[:-1])[:, None] / 2
        s = ((edges[:-1] + edges[1:])[:, None] / 2 + half * nodes).ravel()
        w = (half * weights).ravel()
        return (1 - (1 - s**r) ** b) @ w

    fp = area(0.0, threshold)
    fn = (1.0 - threshold) - area(threshold, 1.0)
    best = int(np.argmin(fp * false_positive_weight + fn * false_negative_weight))
    return int(pairs[best, 0]), int(pairs[best, 1])


def candidate_probability(s: float, bands: int, rows: int) -> float:
    """P(two records at Jaccard s share a bucket in at least one band): the LSH S-curve."""
    return 1.0 - (1.0 - s**rows) ** bands


def lsh_params(threshold: float, num_perm: int, candidate_recall: float) -> tuple[int, int]:
    """(bands, rows): with candidate_recall 0, datasketch's balanced choice (optimal_bands); else,
    among bands*rows <= num_perm whose S-curve at the threshold reaches candidate_recall, the one
    with the least false-positive area below the threshold (fewest candidates to confirm).

    Why: the balanced choice puts the S-curve's midpoint at the threshold, so a pair at exactly
    0.8 became a candidate 40% of the time (9 bands of 13 rows); every candidate is confirmed by
    true Jaccard, so a lower curve costs only confirmation time, never precision."""
    if candidate_recall <= 0:
        return optimal_bands(threshold, num_perm)
    best: tuple[float, int, int] | None = None
    s = np.linspace(0.0, threshold, 257)
    for rows in range(1, num_perm + 1):
        for bands in range(1, num_perm // rows + 1):
            if candidate_probability(threshold, bands, rows) >= candidate_recall:
                fp = float(np.trapezoid(1.0 - (1.0 - s**rows) ** bands, s))
                if best is None or fp < best[0]:
                    best = (fp, bands, rows)
                break  # more bands only add false positives
    if best is None:
        raise ValueError(f"dedupe.candidate_recall: no bands x rows <= {num_perm} (dedupe.num_perm) reaches "
                         f"P(candidate) {candidate_recall} at threshold {threshold}")
    return best[1], best[2]


def band_hashes(sig: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """(documents, bands) uint64: one hash of each band's `rows` signature values."""
    s = sig[:, : bands * rows].reshape(len(sig), bands, rows).astype(U64)
    acc = np.zeros((len(sig), bands), U64)
    for j in range(rows):
        acc *= SHINGLE_BASE
        acc += s[:, :, j]
    return mix64(acc)


def _bucket_pairs(column: np.ndarray, all_pairs_bucket: int, link_crowded: bool) -> tuple[np.ndarray, np.ndarray]:
    """(codes i * n + j, i < j, of the pairs that one column's buckets give; the rows of its crowded
    buckets), by sorting the column.

    A bucket of up to `all_pairs_bucket` rows gives all its pairs; a bigger one gives, with
    `link_crowded`, each row paired with the bucket's lowest row and with its neighbour (a star
    and a chain, O(size)), else nothing. Only the rows of shared buckets are carried past the
    sort, so the temporaries are ~26 bytes a row, whatever the number of bands."""
    n = len(column)
    order = np.argsort(column, kind="stable")  # stable: rows ascend within a bucket, so i < j below
    values = column[order]
    same = values[1:] == values[:-1]
    shared = np.zeros(n, bool)
    shared[1:] = same
    shared[:-1] |= same
    del same
    at = np.flatnonzero(shared)
    del shared
    rows, values = order[at], values[at]
    del order, at
    m = len(rows)
    if m == 0:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    new = np.ones(m, bool)
    new[1:] = values[1:] != values[:-1]
    starts = np.flatnonzero(new)
    run = np.cumsum(new) - 1
    first = starts[run]
    size = np.diff(np.append(starts, m))[run]
    end = first + size
    small = size <= all_pairs_bucket
    pos = np.arange(m)
    linked = (pos != first) & (small | link_crowded)
    found = [rows[first[linked]] * n + rows[linked]]  # the star
    for d in range(1, min(all_pairs_bucket, int(size.max()))):  # pairs d apart in a bucket
        p = pos[: m - d]
        ok = linked[: m - d] & (p + d < end[: m - d]) & (small[: m - d] | (d == 1))
        found.append(rows[p[ok]] * n + rows[p[ok] + d])
    return np.unique(np.concatenate(found)), rows[~small]


def _as_columns(matrix: np.ndarray | Iterable[np.ndarray]) -> Iterable[np.ndarray]:
    return (matrix[:, j] for j in range(matrix.shape[1])) if isinstance(matrix, np.ndarray) else matrix


def _decode(codes: np.ndarray, n: int) -> np.ndarray:
    return np.stack([codes // n, codes % n], 1) if len(codes) else np.empty((0, 2), np.int64)


def lsh_candidates(bands: np.ndarray | Iterable[np.ndarray],
                   all_pairs_bucket: int = ALL_PAIRS_BUCKET) -> tuple[np.ndarray, np.ndarray]:
    """(unique (i, j), i < j, sorted, of rows sharing a bucket in at least one band; whether each row
    is in a crowded bucket, bigger than `all_pairs_bucket`, in some band), by sorting band hashes.

    `bands` is a (records, bands) matrix or its columns one at a time (the stage reads them
    from disk, so the matrix is never in memory). A crowded bucket (boilerplate) gives a star
    and a chain (_bucket_pairs), so a bucket costs O(size) and clusters still connect; near
    pairs inside it that are not neighbours are found by `residual_pairs` on the crowded
    rows' signatures."""
    codes, crowded, n = np.empty(0, np.int64), np.zeros(0, bool), 0
    for column in _as_columns(bands):
        n = len(column)
        if len(crowded) != n:
            crowded = np.zeros(n, bool)
        if n < 2:
            break
        found, crowded_rows = _bucket_pairs(column, all_pairs_bucket, link_crowded=True)
        del column
        crowded[crowded_rows] = True
        codes = np.union1d(codes, found)  # a pair found in several bands is held once
    return _decode(codes, n), crowded


def candidate_pairs(bh: np.ndarray, all_pairs_bucket: int = ALL_PAIRS_BUCKET) -> np.ndarray:
    """Unique (i, j), i < j, of rows sharing a bucket in at least one band (lsh_candidates' pairs)."""
    return lsh_candidates(bh, all_pairs_bucket)[0]


def residual_pairs(sig: np.ndarray | Iterable[np.ndarray], all_pairs_bucket: int = ALL_PAIRS_BUCKET) -> np.ndarray:
    """Unique (i, j), i < j, of rows whose signatures share a value at some position that at most
    `all_pairs_bucket` rows share: LSH with one row per band, for the rows of crowded buckets.
    `sig` is a (records, positions) matrix or its columns one at a time.

    Why: members of a crowded bucket agree on the boilerplate's minima, so a band rarely tells
    two near copies apart from the rest (their bands fall into the crowded bucket), and the
    star and chain only pair neighbours. But where a signature value comes from a record's own
    code, few records share it: two near copies at Jaccard 0.8 share such a value at several of
    the positions, unrelated members almost never. Values shared by more rows are boilerplate
    (or common code) and give nothing here."""
    codes, n = np.empty(0, np.int64), 0
    for column in _as_columns(sig):
        n = len(column)
        codes = np.union1d(codes, _bucket_pairs(column, all_pairs_bucket, link_crowded=False)[0])
    return _decode(codes, n)


def unique_pairs(found: list[np.ndarray], n: int) -> np.ndarray:
    """The pairs in `found` as unique (low, high) rows, sorted."""
    if not found:
        return np.empty((0, 2), np.int64)
    codes = [np.minimum(p[:, 0], p[:, 1]).astype(np.int64) * n + np.maximum(p[:, 0], p[:, 1]) for p in found]
    return _decode(np.unique(np.concatenate(codes)), n)
