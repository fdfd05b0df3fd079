"""Perplexity with an interval, from per-window mean NLLs (`pipeline.core.perplexity`).

The interval is a Student-t interval over the windows on the mean NLL (the windows are equal in
length, so their mean is the token mean), exponentiated: exp is monotone, so the bounds are
those of the perplexity. What it covers is the spread of the text: windows of one contiguous
text are not independent draws, so read it as a guide to the text's variation, not a sampling
guarantee. Several edits measured on the same windows (the independent protocol's cases) are
averaged window by window first (`over_edits`), so the interval stays over the same windows
and compares with the unedited model's; the per-edit values are reported beside it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from metrics.intervals import mean_ci

INTERVAL = "Student-t over the windows on the mean NLL, exponentiated"


def perplexity(window_nlls: Sequence[float], tokens_per_window: int) -> dict[str, float]:
    """exp(mean NLL) with its interval; n counts windows, `tokens` the predicted tokens."""
    nll = mean_ci(window_nlls)
    return {
        "mean": math.exp(nll["mean"]),
        "low": math.exp(nll["low"]),
        "high": math.exp(nll["high"]),
        "n": nll["n"],
        "tokens": nll["n"] * tokens_per_window,
        "nll": nll["mean"],
    }


def over_edits(per_edit: Sequence[Sequence[float]], tokens_per_window: int) -> dict:
    """The perplexity of several edits each measured alone on the same windows: exp of the mean
    NLL over edits and windows, the interval over windows of each window's mean over the edits,
    and each edit's own perplexity (`per_edit`)."""
    table = np.asarray(per_edit, dtype=np.float64)  # (edits, windows)
    if table.ndim != 2 or not table.size:
        raise ValueError(f"per_edit must be (edits, windows) NLLs, got shape {table.shape}")
    summary = perplexity(table.mean(axis=0).tolist(), tokens_per_window)
    summary["edits"] = table.shape[0]
    summary["per_edit"] = [math.exp(row.mean()) for row in table]
    return summary
