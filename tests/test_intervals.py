import math

import numpy as np
import pytest

from metrics.intervals import mean_ci, rate_ci, wilson_ci


def test_mean_ci_hand_computed():
    # values 1..5: mean 3, sd sqrt(2.5), sem sqrt(0.5), t(0.975, 4) = 2.7764451
    ci = mean_ci([1, 2, 3, 4, 5])
    half = 2.7764451051977987 * math.sqrt(0.5)
    assert ci["n"] == 5 and ci["mean"] == 3
    assert ci["low"] == pytest.approx(3 - half) and ci["high"] == pytest.approx(3 + half)


def test_mean_ci_edge_cases():
    assert mean_ci([])["n"] == 0 and math.isnan(mean_ci([])["mean"])
    one = mean_ci(np.array([0.5]))
    assert one["mean"] == 0.5 and math.isnan(one["low"])
    assert mean_ci([2, 2, 2])["low"] == 2


@pytest.mark.parametrize(
    ("successes", "n", "low", "high"),
    [
        (5, 5, 0.5655, 1.0),
        (199, 200, 0.9722, 0.9991),
        (0, 5, 0.0, 0.4345),
        (66, 200, 0.2686, 0.3978),
    ],
)
def test_wilson_matches_the_issue_and_scipy(successes, n, low, high):
    from scipy import stats

    ci = wilson_ci(successes, n)
    assert ci["mean"] == successes / n and ci["n"] == n
    assert ci["low"] == pytest.approx(low, abs=5e-5) and ci["high"] == pytest.approx(high, abs=5e-5)
    reference = stats.binomtest(successes, n).proportion_ci(0.95, method="wilson")
    assert ci["low"] == pytest.approx(reference.low, abs=1e-12)
    assert ci["high"] == pytest.approx(reference.high, abs=1e-12)


def test_wilson_never_collapses_where_the_t_interval_does():
    assert mean_ci([1.0] * 5)["low"] == 1.0  # the t interval claims certainty
    assert wilson_ci(5, 5)["low"] < 0.6
    assert math.isnan(wilson_ci(0, 0)["mean"])
    with pytest.raises(ValueError):
        wilson_ci(6, 5)


def test_rate_ci_counts_case_fractions():
    # Two cases with 1 of 2 paraphrases right and one with both: 2 successes in 3 cases.
    assert rate_ci([0.5, 0.5, 1.0]) == wilson_ci(2, 3)
    assert rate_ci([1.0] * 199 + [0.0])["low"] == pytest.approx(wilson_ci(199, 200)["low"])
