"""CounterFact metrics on hand-computed examples."""

import math

import numpy as np
import pytest

from metrics.counterfact import case_metrics, harmonic_mean, probability, summarize


def test_probability_is_exp_of_minus_mean_nll():
    # Two target tokens with probabilities 0.5 and 0.2: mean NLL = (ln 2 + ln 5) / 2.
    mean_nll = (math.log(2) + math.log(5)) / 2
    assert probability(mean_nll) == pytest.approx(math.sqrt(0.5 * 0.2))


def test_case_metrics_by_hand():
    case = case_metrics(
        {
            "rewrite": [(0.6, 0.1)],
            "paraphrase": [(0.3, 0.4), (0.5, 0.2)],  # one of two succeeds
            "neighborhood": [(0.1, 0.7), (0.2, 0.3), (0.5, 0.4)],  # two of three keep the truth
        }
    )
    assert case["ES"] == 1.0 and case["EM"] == pytest.approx(0.5)
    assert case["PS"] == 0.5 and case["PM"] == pytest.approx(((0.3 - 0.4) + (0.5 - 0.2)) / 2)
    assert case["NS"] == pytest.approx(2 / 3)
    assert case["NM"] == pytest.approx(((0.7 - 0.1) + (0.3 - 0.2) + (0.4 - 0.5)) / 3)
    assert case_metrics({"rewrite": [(0.2, 0.2)]})["ES"] == 0.0  # a tie is no success
    assert math.isnan(case_metrics({"rewrite": [(0.6, 0.1)]})["PS"])


def test_summary_percent_intervals_and_score():
    cases = [
        {"ES": 1.0, "EM": 0.5, "PS": 1.0, "PM": 0.2, "NS": 1.0, "NM": 0.1},
        {"ES": 1.0, "EM": 0.3, "PS": 0.0, "PM": -0.1, "NS": 0.5, "NM": 0.0},
        {"ES": 0.0, "EM": -0.1, "PS": math.nan, "PM": math.nan, "NS": 1.0, "NM": 0.2},
    ]
    summary = summarize(cases)
    assert summary["ES"]["mean"] == pytest.approx(200 / 3) and summary["ES"]["n"] == 3
    assert summary["PS"]["n"] == 2 and summary["PS"]["mean"] == pytest.approx(50)
    half = 4.302652730 * np.std([0.5, 0.3, -0.1], ddof=1) / math.sqrt(3) * 100  # t(0.975, 2)
    assert summary["EM"]["high"] - summary["EM"]["mean"] == pytest.approx(half, rel=1e-6)
    # PS: 1 success in 2 cases, Wilson (not the t interval, which would clip to [0, 100]).
    assert summary["PS"]["low"] == pytest.approx(9.453, abs=1e-3)
    assert summary["PS"]["high"] == pytest.approx(90.547, abs=1e-3)
    assert [summary[k]["interval"] for k in ("ES", "EM", "S")] == ["wilson", "t", "bootstrap"]
    # S over the two cases that have all of ES, PS, NS: hmean(1.0, 0.5, 0.75).
    expected = 3 / (1 / 1.0 + 1 / 0.5 + 1 / 0.75) * 100
    assert summary["S"]["mean"] == pytest.approx(expected) and summary["S"]["n"] == 2
    assert summary["S"]["low"] <= summary["S"]["mean"] <= summary["S"]["high"]
    assert summarize(cases) == summary  # the bootstrap is seeded


def test_harmonic_mean_edges():
    assert harmonic_mean([1.0, 0.0, 1.0]) == 0.0
    assert math.isnan(harmonic_mean([1.0, math.nan]))
    assert harmonic_mean([0.5, 0.5]) == pytest.approx(0.5)


def test_intervals_stay_in_the_possible_range():
    cases = [{"ES": 1.0, "EM": 0.9}, {"ES": 1.0, "EM": 0.99}, {"ES": 0.0, "EM": 0.95}]
    summary = summarize(cases)
    assert summary["ES"]["low"] >= 0.0 and summary["ES"]["high"] <= 100.0
    assert summary["EM"]["high"] <= 100.0


def test_success_rates_use_wilson_intervals():
    # The example: 199 of 200 rewrites succeed -> 97.2-99.9, not the t interval 98.5-100.
    cases = [{"ES": 1.0}] * 199 + [{"ES": 0.0}]
    es = summarize(cases)["ES"]
    assert es["mean"] == pytest.approx(99.5)
    assert es["low"] == pytest.approx(97.22, abs=0.01) and es["high"] == pytest.approx(
        99.91, abs=0.01
    )
    five = summarize([{"NS": 1.0}] * 5)["NS"]
    assert five["low"] == pytest.approx(56.55, abs=0.01) and five["high"] == 100.0
