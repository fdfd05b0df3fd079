"""Confidence intervals, always reported with the sample count they rest on.

scipy is imported where it is used, so the tracing and editing algorithms that import this module
run with torch and transformers alone (a GPU machine may have nothing else).
"""

from __future__ import annotations

import math
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
