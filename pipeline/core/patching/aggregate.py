"""Averaging indirect effects over prompts by token position, as in the paper's figures.

Token positions fall into six buckets relative to the subject. Each prompt contributes one sample
per bucket it has (the mean over that bucket's positions in the prompt), so a bucket's sample
count is the number of prompts that have it. The original code built the confidence interval of
every bucket with the total number of prompts, overstating the certainty of the buckets that not
every prompt has (middle subject tokens, further tokens).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from metrics.intervals import column_mean_ci

BUCKETS = (
    "first_subject",
    "middle_subject",
    "last_subject",
    "first_subsequent",
    "further",
    "last",
)
FIRST_SUBJECT, MIDDLE_SUBJECT, LAST_SUBJECT, FIRST_SUBSEQUENT, FURTHER, LAST = range(6)
BEFORE_SUBJECT = -1


def bucket_positions(n_tokens: int, subject_span: tuple[int, int]) -> list[int]:
    """The bucket index of each token position, -1 for tokens before the subject.

    Every position gets exactly one bucket. Where buckets coincide, the subject wins over the
    positions after it, and the last token wins over the other positions after the subject:
      - a one-token subject is its "last subject token" (it has no first/middle bucket);
      - a subject that ends the prompt keeps its "last subject token" (no "last token" bucket);
      - a first subsequent token that is also the last token is the "last token".
    """
    start, end = subject_span
    if not 0 <= start < end <= n_tokens:
        raise ValueError(f"subject span {subject_span} does not fit {n_tokens} tokens")
    buckets = []
    for position in range(n_tokens):
        if position < start:
            bucket = BEFORE_SUBJECT
        elif position == end - 1:
            bucket = LAST_SUBJECT
        elif position == start:
            bucket = FIRST_SUBJECT
        elif position < end:
            bucket = MIDDLE_SUBJECT
        elif position == n_tokens - 1:
            bucket = LAST
        elif position == end:
            bucket = FIRST_SUBSEQUENT
        else:
            bucket = FURTHER
        buckets.append(bucket)
    return buckets


@dataclass
class BucketAverage:
    """Per bucket and layer: mean effect and confidence interval over prompts."""

    mean: np.ndarray  # (buckets, layers)
    low: np.ndarray  # (buckets, layers); NaN where fewer than 2 prompts have the bucket
    high: np.ndarray
    count: np.ndarray  # (buckets,) number of prompts that have the bucket
    names: tuple[str, ...] = BUCKETS


def average_by_bucket(
    effects: Sequence[torch.Tensor | np.ndarray],
    subject_spans: Sequence[tuple[int, int]],
    confidence: float = 0.95,
) -> BucketAverage:
    """Average (tokens, layers) effect grids of many prompts per bucket, with t intervals."""
    if len(effects) != len(subject_spans):
        raise ValueError("need one subject span per effect grid")
    samples: list[list[np.ndarray]] = [[] for _ in BUCKETS]
    n_layers = None
    for effect, span in zip(effects, subject_spans, strict=True):
        grid = np.asarray(torch.as_tensor(effect, dtype=torch.float64).cpu())
        if grid.ndim != 2 or (n_layers is not None and grid.shape[1] != n_layers):
            raise ValueError("effects must be (tokens, layers) grids with the same layer count")
        n_layers = grid.shape[1]
        buckets = np.asarray(bucket_positions(grid.shape[0], span))
        for bucket in range(len(BUCKETS)):
            if (buckets == bucket).any():
                samples[bucket].append(grid[buckets == bucket].mean(axis=0))
    if n_layers is None:
        raise ValueError("no effects to average")
    shape = (len(BUCKETS), n_layers)
    mean, low, high = np.full(shape, np.nan), np.full(shape, np.nan), np.full(shape, np.nan)
    count = np.array([len(s) for s in samples])
    for bucket, rows in enumerate(samples):
        if rows:
            mean[bucket], low[bucket], high[bucket], _ = column_mean_ci(np.stack(rows), confidence)
    return BucketAverage(mean, low, high, count)
