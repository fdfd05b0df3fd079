"""How an estimated causal trace (attribution patching, `trace.engine=attribution`) agrees with
the exact one: per cell on prompts traced both ways, and on the bucket averages.

Effects are restored minus corrupted p(answer), so a cell's error is that of the estimated
effect. Per cell, only cells from the first subject token on count: before it the corrupted run
equals the clean one and both engines give the corrupted probability by construction.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from pipeline.core.patching import BUCKETS, bucket_positions


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson's r over the cells both have (NaN with fewer than three)."""
    ok = np.isfinite(a) & np.isfinite(b)
    return float(np.corrcoef(a[ok], b[ok])[0, 1]) if ok.sum() > 2 else float("nan")


def per_cell(
    exact: Sequence[Mapping[str, Any]], estimate: Sequence[Mapping[str, Any]], kinds: Sequence[str]
) -> list[dict[str, Any]]:
    """Per kind (then per severed path): r, mean and largest absolute error of the estimated
    effects against the exact ones over the prompts traced both ways (records in the trace
    stage's per-prompt schema, in the same order), the mean |exact effect| for scale, and where
    (token bucket, layer) the mean error is largest."""
    rows = []
    for kind in kinds:
        x, y, where = [], [], {}
        for ex, es in zip(exact, estimate, strict=True):
            start = ex["subject_span"][0]
            a = np.asarray(ex["kinds"][kind], dtype=float)[start:] - ex["corrupted"]
            b = np.asarray(es["kinds"][kind], dtype=float)[start:] - es["corrupted"]
            x.append(a.ravel())
            y.append(b.ravel())
            buckets = bucket_positions(len(ex["kinds"][kind]), tuple(ex["subject_span"]))
            for t, row in enumerate(np.abs(a - b)):
                where.setdefault(BUCKETS[buckets[start + t]], []).append(row)
        a, b = np.concatenate(x), np.concatenate(y)
        worst = max(where, key=lambda name: np.mean(where[name]))
        rows.append(
            {
                "kind": kind,
                "prompts": len(exact),
                "r": correlation(a, b),
                "mae": float(np.mean(np.abs(a - b))),
                "max_error": float(np.max(np.abs(a - b))),
                "mean_abs_exact": float(np.mean(np.abs(a))),
                "worst": {"bucket": worst, "layer": int(np.argmax(np.mean(where[worst], axis=0)))},
            }
        )
    for name in exact[0].get("severed", {}) if exact else ():
        a = np.array([np.asarray(r["severed"][name]) - r["corrupted"] for r in exact])
        b = np.array([np.asarray(r["severed"][name]) - r["corrupted"] for r in estimate])
        rows.append(
            {
                "kind": f"severed {name}",
                "prompts": len(exact),
                "r": correlation(a.ravel(), b.ravel()),
                "mae": float(np.mean(np.abs(a - b))),
                "max_error": float(np.max(np.abs(a - b))),
                "mean_abs_exact": float(np.mean(np.abs(a))),
            }
        )
    return rows


def on_averages(
    exact: Mapping[str, Any],
    estimate: Mapping[str, Any],
    buckets: Sequence[str] = ("last_subject", "last"),
) -> list[dict[str, Any]]:
    """Per kind: r and largest and mean |difference| of the (bucket, layer) average effects, the
    largest exact average for scale, and the peak layer under both at the named buckets."""
    rows = []
    for kind in exact["kinds"]:
        a = np.asarray(exact["kinds"][kind]["mean"], dtype=float)
        b = np.asarray(estimate["kinds"][kind]["mean"], dtype=float)
        peaks = {
            bucket: {
                "exact": int(np.nanargmax(a[BUCKETS.index(bucket)])),
                "estimate": int(np.nanargmax(b[BUCKETS.index(bucket)])),
            }
            for bucket in buckets
        }
        rows.append(
            {
                "kind": kind,
                "r": correlation(a.ravel(), b.ravel()),
                "max_difference": float(np.nanmax(np.abs(a - b))),
                "mean_difference": float(np.nanmean(np.abs(a - b))),
                "largest_exact": float(np.nanmax(a)),
                "peaks": peaks,
            }
        )
    return rows
