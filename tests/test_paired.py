"""Paired editor-against-editor statistics against plain implementations and published numbers."""

import math

import numpy as np
import pytest
from scipy import stats

from metrics.counterfact import harmonic_mean
from metrics.paired import (
    holm,
    mcnemar_exact,
    mean_difference,
    newcombe_paired,
    rate_difference,
    score_difference,
)

Z = stats.norm.ppf(0.975)


def plain_wilson(x, n):
    p = x / n
    centre = (2 * n * p + Z**2) / (2 * (n + Z**2))
    half = Z * math.sqrt(Z**2 + 4 * n * p * (1 - p)) / (2 * (n + Z**2))
    return centre - half, centre + half


def plain_newcombe(a, b, c, d):
    """Newcombe (1998) method 10, written out as in the paper."""
    n = a + b + c + d
    p1, p2 = (a + b) / n, (a + c) / n
    l1, u1 = plain_wilson(a + b, n)
    l2, u2 = plain_wilson(a + c, n)
    e, f, g, h = a + b, c + d, a + c, b + d
    if 0 in (e, f, g, h):
        phi = 0.0
    elif a * d - b * c > n / 2:
        phi = (a * d - b * c - n / 2) / math.sqrt(e * f * g * h)
    elif a * d - b * c >= 0:
        phi = 0.0
    else:
        phi = (a * d - b * c) / math.sqrt(e * f * g * h)
    delta = math.sqrt((p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2)
    epsilon = math.sqrt((u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2)
    return p1 - p2 - delta, p1 - p2 + epsilon


@pytest.mark.parametrize("table", [(59, 6, 16, 80), (12, 9, 2, 21), (1, 1, 7, 12), (5, 0, 0, 5)])
def test_newcombe_equals_the_plain_formula(table):
    got = newcombe_paired(*table)
    low, high = plain_newcombe(*table)
    n = sum(table)
    assert got["mean"] == pytest.approx((table[1] - table[2]) / n, abs=1e-12)
    # The same arithmetic in another order: float rounding only.
    assert got["low"] == pytest.approx(low, abs=1e-12) and got["high"] == pytest.approx(
        high, abs=1e-12
    )


def test_newcombe_against_a_published_worked_example():
    # Fagerland, Lydersen & Laake (2017), Statistical Analysis of Contingency Tables, ch. 8:
    # complete response before/after consolidation therapy (Cavo et al. 2012), table
    # [[59, 6], [16, 80]]: Newcombe square-and-add, -0.0621 (95% CI -0.1186 to -0.0046),
    # printed to four decimals.
    got = newcombe_paired(59, 6, 16, 80)
    assert round(got["mean"], 4) == -0.0621
    assert round(got["low"], 4) == -0.1186 and round(got["high"], 4) == -0.0046


@pytest.mark.parametrize("b, c", [(6, 16), (0, 5), (3, 3), (0, 0), (10, 1)])
def test_mcnemar_is_scipys_binomial_test_on_the_discordant_pairs(b, c):
    expected = 1.0 if b + c == 0 else stats.binomtest(b, b + c, 0.5).pvalue
    assert mcnemar_exact(b, c) == pytest.approx(expected, rel=1e-12)


def test_rate_difference_on_binary_cases_is_newcombe_and_mcnemar():
    x = np.array([1] * 59 + [1] * 6 + [0] * 16 + [0] * 80, dtype=float)
    y = np.array([1] * 59 + [0] * 6 + [1] * 16 + [0] * 80, dtype=float)
    got = rate_difference(x, y)
    assert got["interval"] == "newcombe"
    assert (got["low"], got["high"]) == pytest.approx(plain_newcombe(59, 6, 16, 80), abs=1e-12)
    assert got["p"] == pytest.approx(stats.binomtest(6, 22, 0.5).pvalue, rel=1e-12)
    assert rate_difference(x, np.where(np.arange(161) < 3, np.nan, y))["n"] == 158


def test_fractional_cases_get_a_paired_t_interval_and_a_sign_test():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 11, 40) / 10  # NS over ten neighbours
    y = rng.integers(0, 11, 40) / 10
    got = rate_difference(x, y)
    d = x - y
    half = stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d))
    assert got["interval"] == "t"
    assert (got["low"], got["high"]) == pytest.approx((d.mean() - half, d.mean() + half), abs=1e-12)
    sign = stats.binomtest(int((d > 0).sum()), int((d != 0).sum()), 0.5).pvalue
    assert got["p"] == pytest.approx(sign, rel=1e-12)


def test_mean_difference_is_the_paired_t_test():
    rng = np.random.default_rng(1)
    x, y = rng.normal(10, 2, 30), rng.normal(9, 2, 30)
    got = mean_difference(x, y)
    test = stats.ttest_rel(x, y)
    interval = test.confidence_interval(0.95)
    assert got["p"] == pytest.approx(test.pvalue, rel=1e-10)
    assert (got["low"], got["high"]) == pytest.approx((interval.low, interval.high), abs=1e-10)


def test_score_difference_is_a_joint_bootstrap_over_cases():
    rng = np.random.default_rng(2)
    x = rng.integers(0, 2, (50, 3)).astype(float)
    y = rng.integers(0, 2, (50, 3)).astype(float)
    got = score_difference(x, y, seed=7, resamples=500)
    index = np.random.default_rng(7).integers(0, 50, size=(500, 50))

    def s(rows):
        return harmonic_mean(rows.mean(axis=0))

    deltas = np.array([s(x[i]) - s(y[i]) for i in index])  # a plain loop, one resample at a time
    assert got["mean"] == pytest.approx(s(x) - s(y), abs=1e-12)
    low, high = np.quantile(deltas, [0.025, 0.975])
    assert (got["low"], got["high"]) == pytest.approx((low, high), abs=1e-12)
    tail = min((deltas <= 0).sum(), (deltas >= 0).sum())
    assert got["p"] == pytest.approx(min(1, 2 * (tail + 1) / 501))
    assert score_difference(x, y, seed=7, resamples=500) == got  # seeded


def test_score_difference_of_an_editor_with_itself_is_zero():
    x = np.random.default_rng(3).integers(0, 2, (20, 3)).astype(float)
    got = score_difference(x, x)
    assert got["mean"] == got["low"] == got["high"] == 0 and got["p"] == 1


def test_holm_against_a_hand_example():
    # p = 0.01, 0.04, 0.03, 0.005 (m = 4): sorted 0.005, 0.01, 0.03, 0.04 -> 4x0.005 = 0.02,
    # 3x0.01 = 0.03, 2x0.03 = 0.06, max(1x0.04, 0.06) = 0.06.
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    adjusted = holm([0.5, math.nan, 0.6])
    assert adjusted[0] == pytest.approx(1.0) and math.isnan(adjusted[1]) and adjusted[2] == 1.0


def test_a_bootstrap_p_with_no_resample_past_zero_is_a_bound():
    x = np.ones((30, 3))
    y = np.column_stack([np.ones(30), np.arange(30) % 2, np.ones(30)])  # PS 50%: S lower
    got = score_difference(x, y, resamples=999)
    assert got["p_bound"] and got["p"] == pytest.approx(2 / 1000)
    assert not score_difference(y, y)["p_bound"]
