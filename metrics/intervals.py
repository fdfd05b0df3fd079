"""Confidence intervals, always reported with the sample count they rest on.

Which interval for which number:
  - success rates (ES, PS, NS: shares of 0/1 outcomes): the Wilson score interval, which stays
    inside [0, 1] and does not collapse to a point at 0 or n successes (5 of 5: 56.6-100%);
  - magnitudes and causal effects (EM, PM, NM, GE, RS, indirect effects): Student-t;
  - the score S (a harmonic mean): a percentile bootstrap over cases (metrics.counterfact).

scipy is imported where it is used, so the tracing and editing algorithms that import this module
run with torch and transformers alone (a GPU machine may have nothing else).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

import numpy as np


def column_mean_ci(
    rows: Sequence[Sequence[float]] | np.ndarray, confidence: float = 0.95
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Per-column mean and Student-t interval over the rows (one row per sample).

    Returns (mean, low, high, n); the bounds are NaN with fewer than two rows.
    """
    data = np.asarray(rows, dtype=np.float64)
    if data.ndim != 2:
        raise ValueError(f"rows must be a 2-D (samples, columns) array, got shape {data.shape}")
    n = data.shape[0]
    mean = data.mean(axis=0) if n else np.full(data.shape[1], np.nan)
    if n < 2:
        nan = np.full_like(mean, np.nan)
        return mean, nan, nan.copy(), n
    from scipy import stats

    half = stats.t.ppf((1 + confidence) / 2, df=n - 1) * data.std(axis=0, ddof=1) / math.sqrt(n)
    return mean, mean - half, mean + half, n


def mean_ci(values: Sequence[float] | np.ndarray, confidence: float = 0.95) -> dict[str, float]:
    """Mean with a Student-t interval over the n values given (n is the number of samples)."""
    data = np.asarray(values, dtype=np.float64).reshape(-1, 1)
    mean, low, high, n = column_mean_ci(data, confidence)
    return {"mean": float(mean[0]), "low": float(low[0]), "high": float(high[0]), "n": n}


def wilson_ci(successes: float, n: int, confidence: float = 0.95) -> dict[str, float]:
    """A success rate with its Wilson score interval (fractions, not percent).

    `successes` may be fractional: a case whose paraphrases half succeed counts 0.5 (the case
    averages of PS and NS), which is the exact Wilson interval when every case is 0 or 1 and a
    conservative one otherwise (a case average varies less than a single 0/1 outcome).
    Returns mean, low, high, n; NaN with n = 0.
    """
    if n == 0:
        return {"mean": math.nan, "low": math.nan, "high": math.nan, "n": 0}
    if not -1e-9 <= successes <= n + 1e-9:
        raise ValueError(f"{successes} successes out of {n}")
    successes = min(max(float(successes), 0.0), float(n))  # sums of fractions round
    z = statistics.NormalDist().inv_cdf((1 + confidence) / 2)
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z / denominator * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return {"mean": p, "low": low, "high": high, "n": n}


def rate_ci(values: Sequence[float] | np.ndarray, confidence: float = 0.95) -> dict[str, float]:
    """The mean of per-sample success fractions in [0, 1] with its Wilson interval."""
    data = np.asarray(values, dtype=np.float64).reshape(-1)
    return wilson_ci(float(data.sum()), len(data), confidence)
