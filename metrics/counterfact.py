"""CounterFact's metrics (Meng et al. 2022, section 4.2), from per-prompt target probabilities.

A prompt's probability of a target is P = exp(-mean NLL of the target's tokens), teacher-forced
after the prompt (the target with its leading space). Per case:

    ES / EM   rewrite prompt:      [P(new) > P(true)]  and  P(new) - P(true)
    PS / PM   paraphrase prompts:  the same, averaged over the case's paraphrases first
    NS / NM   neighbourhood prompts: [P(true) > P(new)]  and  P(true) - P(new), averaged likewise

Over cases each is a mean with a 95% interval: Wilson for the success rates ES, PS, NS (a case
averaging several prompts counts as a fractional success), Student-t for the magnitudes EM, PM,
NM; the score S is the harmonic mean of ES, PS and NS (its interval by a bootstrap over cases). Everything is in percent, as the paper's tables.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from metrics.intervals import mean_ci, rate_ci

PROMPT_KINDS = ("rewrite", "paraphrase", "neighborhood")
CASE_METRICS = ("ES", "EM", "PS", "PM", "NS", "NM")


def probability(mean_nll: float) -> float:
    """P(target) from the mean per-token NLL of its tokens."""
    return math.exp(-mean_nll)


def case_metrics(probs: Mapping[str, Sequence[tuple[float, float]]]) -> dict[str, float]:
    """ES, EM, PS, PM, NS, NM (fractions and probability differences) of one case.

    `probs[kind]` lists (P(new), P(true)) per prompt of that kind. A kind without prompts gives
    NaN (EasyEdit-schema cases have one paraphrase and one neighbour; some have none).
    """
    out = {}
    for kind, success, magnitude in (
        ("rewrite", "ES", "EM"),
        ("paraphrase", "PS", "PM"),
        ("neighborhood", "NS", "NM"),
    ):
        pairs = np.asarray(probs.get(kind, ()), dtype=np.float64).reshape(-1, 2)
        if not len(pairs):
            out[success] = out[magnitude] = math.nan
            continue
        new, true = pairs[:, 0], pairs[:, 1]
        sign = 1.0 if kind != "neighborhood" else -1.0
        out[success] = float(np.mean(sign * (new - true) > 0))
        out[magnitude] = float(np.mean(sign * (new - true)))
    return out


def harmonic_mean(values: Sequence[float]) -> float:
    """The harmonic mean; 0 if any value is 0, NaN if any is NaN."""
    values = np.asarray(values, dtype=np.float64)
    if np.isnan(values).any():
        return math.nan
    if (values <= 0).any():
        return 0.0
    from scipy import stats  # here: the per-case metrics need numpy only

    return float(stats.hmean(values))


def summarize(
    cases: Sequence[Mapping[str, float]], *, confidence: float = 0.95, seed: int = 0
) -> dict[str, dict[str, Any]]:
    """Per metric: mean, interval and n over cases (percent), and which interval it is.

    NaN values (a case without paraphrases, say) are left out of that metric's n.
    """
    summary: dict[str, dict[str, Any]] = {}
    for name in CASE_METRICS:
        values = np.array([case.get(name, math.nan) for case in cases], dtype=np.float64)
        values = values[~np.isnan(values)]
        rate = name.endswith("S")
        interval = (rate_ci if rate else mean_ci)(values, confidence)
        ci: dict[str, Any] = {k: v * 100 if k != "n" else v for k, v in interval.items()}
        if not rate:
            # Differences of probabilities lie in [-100, 100]; the t interval does not know
            # that, so its ends are clipped to the possible range.
            for end in ("low", "high"):
                if not math.isnan(ci[end]):
                    ci[end] = min(max(ci[end], -100.0), 100.0)
        ci["interval"] = "wilson" if rate else "t"
        summary[name] = ci
    summary["S"] = {**score_ci(cases, confidence=confidence, seed=seed), "interval": "bootstrap"}
    return summary


def score_ci(
    cases: Sequence[Mapping[str, float]], *, confidence: float = 0.95, seed: int = 0
) -> dict[str, float]:
    """S = hmean(ES, PS, NS) over the cases that have all three, with a percentile bootstrap."""
    rows = np.array(
        [[case.get(k, math.nan) for k in ("ES", "PS", "NS")] for case in cases], dtype=np.float64
    ).reshape(-1, 3)
    rows = rows[~np.isnan(rows).any(axis=1)]
    n = len(rows)
    if n == 0:
        return {"mean": math.nan, "low": math.nan, "high": math.nan, "n": 0}
    mean = harmonic_mean(rows.mean(axis=0)) * 100
    if n < 2 or np.ptp(rows, axis=0).max() == 0:
        low = high = mean if n >= 2 else math.nan
        return {"mean": mean, "low": low, "high": high, "n": n}
    from scipy import stats

    result = stats.bootstrap(
        (np.arange(n),),
        lambda index: harmonic_mean(rows[index.astype(int)].mean(axis=0)),
        confidence_level=confidence,
        n_resamples=2000,
        method="percentile",
        random_state=np.random.default_rng(seed),
        vectorized=False,
    )
    low, high = result.confidence_interval
    return {"mean": mean, "low": float(low) * 100, "high": float(high) * 100, "n": n}
