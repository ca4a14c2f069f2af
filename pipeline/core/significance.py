"""Paired tests on a continuous per-problem endpoint (an NLL): is model B better than model A on the
same problems, and by how much?

- ``sign_flip_test(diffs)``: the primary test. Under the null that A and B are exchangeable on each
  problem, every per-problem difference is as likely to have either sign; the p-value is the share of
  random sign assignments (seeded) whose mean is at least as far from 0 as the observed mean (two-sided,
  with the observed assignment counted, so p is never 0). Exact enumeration when 2^n is small.
- ``wilcoxon(diffs)``: scipy's Wilcoxon signed-rank test, reported beside it (it tests the median
  of the differences' distribution, so the two can disagree when a few problems carry the gain).
- ``paired_comparison(a, b)``: mean of b - a with a problem-level bootstrap interval and both p-values.
- ``trend_test(xs, ys)``: the least-squares slope of y on x with a permutation p-value (a dose-response
  of NLL against log n).

    python -c "from pipeline.core.significance import *; print(paired_comparison([1.0, 0.9, 0.8], [0.9, 0.85, 0.7]))"
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np

from pipeline.core.passk import bootstrap_interval

PERMUTATIONS = 10_000
EXACT_UP_TO = 16  # 2^16 sign assignments: enumerate instead of sampling


def sign_flip_test(diffs: Sequence[float], permutations: int = PERMUTATIONS, seed: int = 0) -> float:
    """Two-sided p-value of the mean paired difference under random sign flips."""
    d = np.asarray(diffs, dtype=np.float64)
    if d.size == 0:
        raise ValueError("sign_flip_test: no differences")
    observed = abs(d.mean())
    if not np.any(d):
        return 1.0
    # A tolerance so that assignments equal to the observed one (up to rounding) count as extreme.
    tol = 1e-12 * max(1.0, observed)
    if d.size <= EXACT_UP_TO:
        signs = np.array(list(itertools.product((1.0, -1.0), repeat=d.size)))
        means = np.abs(signs @ d) / d.size
        return float(np.mean(means >= observed - tol))
    rng = np.random.default_rng(seed)
    extreme = 0
    for start in range(0, permutations, 2000):  # chunks: 2000 x n signs at a time
        n = min(2000, permutations - start)
        signs = rng.choice((-1.0, 1.0), size=(n, d.size))
        extreme += int(np.sum(np.abs(signs @ d) / d.size >= observed - tol))
    return (extreme + 1) / (permutations + 1)


def wilcoxon(diffs: Sequence[float]) -> float | None:
    """Two-sided Wilcoxon signed-rank p-value; None when every difference is 0."""
    from scipy.stats import wilcoxon as _wilcoxon

    d = np.asarray(diffs, dtype=np.float64)
    if not np.any(d):
        return None
    return float(_wilcoxon(d, zero_method="wilcox", alternative="two-sided").pvalue)


def paired_comparison(a: Sequence[float], b: Sequence[float], seed: int = 0) -> dict:
    """b - a on the same problems: mean, 95% bootstrap interval, sign-flip and Wilcoxon p-values, and
    how many problems moved each way."""
    if len(a) != len(b):
        raise ValueError(f"paired_comparison: {len(a)} values against {len(b)}")
    d = np.asarray(b, dtype=np.float64) - np.asarray(a, dtype=np.float64)
    lo, hi = bootstrap_interval(d.tolist(), seed=seed)
    return {"n": int(d.size), "delta": float(d.mean()), "ci95": [lo, hi],
            "p_value": sign_flip_test(d, seed=seed), "test": "sign-flip permutation (two-sided)",
            "wilcoxon_p": wilcoxon(d), "lower": int(np.sum(d < 0)), "higher": int(np.sum(d > 0))}


def trend_test(xs: Sequence[float], ys: Sequence[float], permutations: int = PERMUTATIONS, seed: int = 0) -> dict:
    """Least-squares slope of ys on xs and its two-sided permutation p-value (ys shuffled against xs)."""
    x, y = np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64)
    if x.size != y.size or x.size < 3:
        raise ValueError(f"trend_test: need at least 3 paired points, got {x.size} and {y.size}")
    xc = x - x.mean()
    if not np.any(xc):
        raise ValueError("trend_test: every x is the same")

    def slope(v: np.ndarray) -> float:
        return float(xc @ (v - v.mean()) / (xc @ xc))

    observed = slope(y)
    n_perm = math.factorial(x.size)
    if n_perm <= permutations:  # few points: every ordering
        slopes = [slope(np.asarray(p)) for p in itertools.permutations(y)]
        p = float(np.mean([abs(s) >= abs(observed) - 1e-12 for s in slopes]))
    else:
        rng = np.random.default_rng(seed)
        extreme = sum(abs(slope(rng.permutation(y))) >= abs(observed) - 1e-12 for _ in range(permutations))
        p = (extreme + 1) / (permutations + 1)
    return {"slope": observed, "p_value": p, "points": int(x.size), "test": "permutation test of the OLS slope"}
