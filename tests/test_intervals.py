import math

import numpy as np
import pytest

from metrics.intervals import mean_ci


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
