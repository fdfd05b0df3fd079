"""The collapse rule, both ways: each condition alone marks a row, and each near miss does not."""

import math

from metrics.collapse import collapsed


def rate(mean, low, high):
    return {"mean": mean, "low": low, "high": high, "n": 200}


# Sequential KN on SmolLM2 after 200 edits (the committed report): coin flips, no preference.
KN_200 = {
    "ES": rate(49.5, 42.6, 56.4),
    "PS": rate(50.5, 43.6, 57.4),
    "NS": rate(47.0, 40.2, 53.9),
    "EM": {"mean": -0.0},
    "PM": {"mean": -0.0},
    "NM": {"mean": 0.0},
}


def test_no_preference_left_and_rates_at_chance_is_collapsed():
    assert "within chance" in collapsed(KN_200)


def test_a_large_magnitude_or_a_rate_beyond_chance_is_not_collapsed():
    assert collapsed({**KN_200, "EM": {"mean": 0.6}}) is None
    assert collapsed({**KN_200, "NM": {"mean": -0.5}}) is None  # |NM| not below 0.5
    # ROME's 1,000-edit mass row: EM 0.0, but ES's interval excludes 50.
    assert collapsed({**KN_200, "ES": rate(54.9, 51.8, 58.0)}) is None
    assert collapsed({**KN_200, "PS": rate(3.0, math.nan, math.nan)}) is None  # no interval
    assert collapsed({k: v for k, v in KN_200.items() if k != "NS"}) is None


def test_perplexity_several_times_the_unedited_is_collapsed_whatever_the_scores():
    healthy = {**KN_200, "EM": {"mean": 80.0}, "ES": rate(99.0, 97.0, 99.8)}
    assert collapsed(healthy) is None
    assert "3.0x" in collapsed(healthy, perplexity=60.0, unedited_perplexity=20.0)
    assert collapsed(healthy, perplexity={"mean": 59.9}, unedited_perplexity={"mean": 20.0}) is None
    assert collapsed(healthy, perplexity=600.0) is None  # no unedited perplexity: rule skipped
    assert collapsed(healthy, perplexity=math.nan, unedited_perplexity=20.0) is None
