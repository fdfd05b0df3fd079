"""Editor against editor on the same cases: paired differences, their intervals and tests.

Two editors run on the same cases give, per case i, scores x_i (editor A) and y_i (editor B).
Everything here is A minus B, in the scores' own unit (fractions for rates), with a 95% interval
and a two-sided p-value:

- **ES, PS, NS** (per-case success in [0, 1]):
  - every case 0 or 1 for both editors: the paired 2x2 table, a = both succeed, b = A only,
    c = B only, d = neither, n = a + b + c + d. The difference is (b - c) / n with Newcombe's
    interval for paired proportions (Newcombe 1998, Stat Med 17:2635, method 10): Wilson
    intervals (l1, u1) of p1 = (a + b) / n and (l2, u2) of p2 = (a + c) / n, the correlation
    phi = C / sqrt((a+b)(c+d)(a+c)(b+d)) with C = ad - bc - n/2 if ad - bc > n/2, 0 if
    0 <= ad - bc <= n/2, ad - bc if negative (and phi = 0 if a margin is empty), and
        low  = D - sqrt((p1 - l1)^2 - 2 phi (p1 - l1)(u2 - p2) + (u2 - p2)^2)
        high = D + sqrt((p2 - l2)^2 - 2 phi (p2 - l2)(u1 - p1) + (u1 - p1)^2).
    The test is the exact McNemar test: min(b, c) of b + c discordant pairs under
    Binomial(b + c, 1/2), two-sided.
  - a case averaging several prompts (PS over 2 paraphrases, NS over 10 neighbours on the full
    schema) is a fraction, and the 2x2 table does not exist. Then the difference is the mean of
    the per-case differences d_i = x_i - y_i with a paired Student-t interval, and the test is
    the exact sign test: the cases with d_i > 0 among those with d_i != 0 under
    Binomial(., 1/2). On 0/1 cases the sign test *is* the McNemar test (the nonzero differences
    are the discordant pairs), so one test serves both; only the interval changes.
- **S** (the harmonic mean of the ES, PS and NS rates): a paired percentile bootstrap over cases.
  Each resample draws case indices once and uses them for both editors, recomputes
  S_A = hmean(ES, PS, NS) and S_B on it and keeps S_A - S_B; the interval is the 2.5 and 97.5
  percentiles, the p-value twice the smaller tail share of the resampled differences at or
  beyond 0 (with the +1 correction: (k + 1) / (B + 1)), at most 1; where no resample reaches
  0 that is a bound, p <= 2 / (B + 1) (`p_bound`). Seeded: a rerun is identical.
- **GE, perplexity and any other per-case magnitude**: the mean per-case difference with a
  paired Student-t interval and the paired t-test's p-value.
- **Holm's step-down correction** over a family of m p-values (the pairs of editors for one
  metric): sorted ascending, p_(j) -> max over k <= j of min(1, (m - k + 1) p_(k)).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from metrics.counterfact import harmonic_mean
from metrics.intervals import mean_ci, wilson_ci

RESAMPLES = 10_000  # S's p-value can be no smaller than 2 / (RESAMPLES + 1), about 2e-4


def _nan(n: int) -> dict[str, float]:
    return {"mean": math.nan, "low": math.nan, "high": math.nan, "n": n, "p": math.nan}


def newcombe_paired(a: int, b: int, c: int, d: int, confidence: float = 0.95) -> dict[str, float]:
    """p1 - p2 = (b - c) / n of a paired 2x2 table with Newcombe's method 10 interval."""
    n = a + b + c + d
    if n == 0:
        return _nan(0)
    p1, p2 = (a + b) / n, (a + c) / n
    one, two = wilson_ci(a + b, n, confidence), wilson_ci(a + c, n, confidence)
    l1, u1, l2, u2 = one["low"], one["high"], two["low"], two["high"]
    margins = (a + b) * (c + d) * (a + c) * (b + d)
    cross = a * d - b * c
    corrected = cross - n / 2 if cross > n / 2 else 0.0 if cross >= 0 else cross
    phi = corrected / math.sqrt(margins) if margins > 0 else 0.0
    low = (
        p1
        - p2
        - math.sqrt(max((p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2, 0))
    )
    high = (
        p1
        - p2
        + math.sqrt(max((p2 - l2) ** 2 - 2 * phi * (p2 - l2) * (u1 - p1) + (u1 - p1) ** 2, 0))
    )
    return {"mean": p1 - p2, "low": max(low, -1.0), "high": min(high, 1.0), "n": n}


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts b (A only) and c (B only)."""
    if b + c == 0:
        return 1.0
    from scipy import stats

    return float(stats.binomtest(min(b, c), b + c, 0.5).pvalue)


def sign_test(differences: Sequence[float] | np.ndarray) -> float:
    """Two-sided exact sign test of per-case differences (zeros dropped): McNemar on 0/1 cases."""
    d = np.asarray(differences, dtype=np.float64)
    return mcnemar_exact(int((d > 0).sum()), int((d < 0).sum()))


def _pairs(x: Sequence[float], y: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """The cases both editors have a value for (NaN on either side drops the case)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(
            f"paired scores need one value per case on each side: {x.shape} vs {y.shape}"
        )
    keep = ~(np.isnan(x) | np.isnan(y))
    return x[keep], y[keep]


def rate_difference(
    x: Sequence[float], y: Sequence[float], confidence: float = 0.95
) -> dict[str, float]:
    """A's success rate minus B's on the same cases (fractions), interval and p (module doc)."""
    x, y = _pairs(x, y)
    n = len(x)
    if n == 0:
        return _nan(0)
    if not ((x >= 0) & (x <= 1) & (y >= 0) & (y <= 1)).all():
        raise ValueError("success rates must lie in [0, 1]")
    p = sign_test(x - y)
    binary = np.isin(x, (0.0, 1.0)).all() and np.isin(y, (0.0, 1.0)).all()
    if binary:
        a, b = int(((x == 1) & (y == 1)).sum()), int(((x == 1) & (y == 0)).sum())
        c, d = int(((x == 0) & (y == 1)).sum()), int(((x == 0) & (y == 0)).sum())
        return {**newcombe_paired(a, b, c, d, confidence), "p": p, "interval": "newcombe"}
    return {**mean_ci(x - y, confidence), "p": p, "interval": "t"}


def mean_difference(
    x: Sequence[float], y: Sequence[float], confidence: float = 0.95
) -> dict[str, float]:
    """Mean per-case A - B with a paired t interval and the paired t-test's p-value."""
    x, y = _pairs(x, y)
    if len(x) < 2:
        return _nan(len(x))
    d = x - y
    if np.ptp(d) == 0:  # the same difference in every case: no spread, no t
        p = 1.0 if d[0] == 0 else 0.0
        return {"mean": float(d[0]), "low": float(d[0]), "high": float(d[0]), "n": len(d), "p": p}
    from scipy import stats

    p = float(stats.ttest_rel(x, y).pvalue)
    return {**mean_ci(d, confidence), "p": p, "interval": "t"}


def score(rows: np.ndarray) -> float:
    """S = hmean of the column means (ES, PS, NS) of (cases, 3) rows, a fraction."""
    return harmonic_mean(rows.mean(axis=0))


def _scores(rows: np.ndarray, index: np.ndarray) -> np.ndarray:
    """`score` of each resample `rows[index[r]]` at once: hmean(v) = 3 / sum(1 / v), 0 where
    a rate is 0 (as `harmonic_mean`)."""
    rates = rows[index].mean(axis=1)  # (resamples, 3)
    with np.errstate(divide="ignore"):
        out = rates.shape[1] / (1 / rates).sum(axis=1)
    return np.where((rates <= 0).any(axis=1), 0.0, out)


def score_difference(
    x: np.ndarray | Sequence[Sequence[float]],
    y: np.ndarray | Sequence[Sequence[float]],
    *,
    confidence: float = 0.95,
    seed: int = 0,
    resamples: int = RESAMPLES,
) -> dict[str, float]:
    """S_A - S_B from (cases, 3) rows of per-case ES, PS, NS, by a paired bootstrap over cases.

    A case missing any of the six values on either side is dropped from both."""
    x, y = (
        np.asarray(x, dtype=np.float64).reshape(-1, 3),
        np.asarray(y, dtype=np.float64).reshape(-1, 3),
    )
    if x.shape != y.shape:
        raise ValueError(f"paired rows need the same cases: {x.shape} vs {y.shape}")
    keep = ~(np.isnan(x).any(axis=1) | np.isnan(y).any(axis=1))
    x, y = x[keep], y[keep]
    n = len(x)
    if n == 0:
        return _nan(0)
    mean = score(x) - score(y)
    if n < 2:
        return {**_nan(n), "mean": mean}
    index = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    deltas = _scores(x, index) - _scores(y, index)
    alpha = 1 - confidence
    low, high = np.quantile(deltas, [alpha / 2, 1 - alpha / 2])
    tail = min((deltas <= 0).sum(), (deltas >= 0).sum())
    p = min(1.0, 2 * (tail + 1) / (resamples + 1))
    return {
        "p_bound": bool(tail == 0),
        "mean": mean,
        "low": float(low),
        "high": float(high),
        "n": n,
        "p": p,
        "interval": "bootstrap",
    }


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm-adjusted p-values in the given order; NaN stays NaN and is not counted in m."""
    p = np.asarray(pvalues, dtype=np.float64)
    adjusted = np.full_like(p, np.nan)
    present = np.flatnonzero(~np.isnan(p))
    m = len(present)
    running = 0.0
    for rank, position in enumerate(present[np.argsort(p[present], kind="stable")]):
        running = max(running, min(1.0, (m - rank) * p[position]))
        adjusted[position] = running
    return [float(v) for v in adjusted]
