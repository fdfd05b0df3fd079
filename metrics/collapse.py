"""Is an edited model (a table row, a checkpoint) collapsed? A stated rule, not a judgement.

A row is **collapsed** when either holds:

1. **perplexity**: the edited model's perplexity on the held-out text is at least
   `PERPLEXITY_FACTOR` (3) times the unedited model's (only where both are measured); or
2. **no preference left**: the magnitudes |EM|, |PM| and |NM| are all below
   `MAGNITUDE_POINTS` (0.5 percentage points) *and* the success rates ES, PS and NS are all
   within chance: each one's 95% interval contains 50%. The model then puts (almost) the same
   probability on the new and the true object everywhere, and its success rates are coin flips;
   their harmonic mean S (about 50) would otherwise rank it above an unedited model (S 39 on
   SmolLM2), which is why a collapsed row never counts as better than another.

Rates and magnitudes are in percent, as `metrics.counterfact.summarize` gives them. A rate
without an interval (n = 1) cannot be shown to be within chance, so the second rule does not
fire on it. The rule is deliberately strict: ROME's 1,000-edit mass row on SmolLM2 (EM 0.0, but
ES 54.9 [51.8, 58.0], whose interval excludes 50) is damaged but not "collapsed" by it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

PERPLEXITY_FACTOR = 3.0
MAGNITUDE_POINTS = 0.5
CHANCE = 50.0
RATES, MAGNITUDES = ("ES", "PS", "NS"), ("EM", "PM", "NM")


def _value(metric: Any) -> float:
    """A metric's mean, from a {mean, ...} summary or a bare number; NaN where absent."""
    if isinstance(metric, Mapping):
        metric = metric.get("mean")
    return math.nan if metric is None else float(metric)


def _within_chance(metric: Mapping[str, Any] | None) -> bool:
    if not metric:
        return False
    low, high = _value({"mean": metric.get("low")}), _value({"mean": metric.get("high")})
    return low <= CHANCE <= high  # False with a NaN bound


def collapsed(
    metrics: Mapping[str, Any],
    perplexity: Any = None,
    unedited_perplexity: Any = None,
) -> str | None:
    """Why the row with these metrics (percent) is collapsed, in words, or None if it is not.

    `perplexity` and `unedited_perplexity`: numbers or {mean} summaries; either missing skips
    the perplexity rule."""
    edited, unedited = _value(perplexity), _value(unedited_perplexity)
    if edited >= PERPLEXITY_FACTOR * unedited > 0:  # False if either is NaN
        return (
            f"perplexity {edited:.1f} is {edited / unedited:.1f}x the unedited {unedited:.1f} "
            f"(at least {PERPLEXITY_FACTOR:g}x)"
        )
    magnitudes = [_value(metrics.get(k)) for k in MAGNITUDES]
    if all(abs(m) < MAGNITUDE_POINTS for m in magnitudes) and all(
        _within_chance(metrics.get(k)) for k in RATES
    ):
        return (
            f"|EM|, |PM|, |NM| below {MAGNITUDE_POINTS:g} points and ES, PS, NS all within "
            "chance (each interval contains 50%)"
        )
    return None
