"""Averaging indirect effects over prompts by token position, as in the paper's figures.

Token positions fall into six buckets relative to the subject. Two ways to pool them:

`prompt` (the default): each prompt contributes one sample per bucket it has (the mean over that
bucket's positions in the prompt), so a bucket's sample count is the number of prompts that have
it and every position is in exactly one bucket. The original code built the confidence interval
of every bucket with the total number of prompts, overstating the certainty of the buckets that
not every prompt has (middle subject tokens, further tokens).

`paper`: as the paper's notebook (`notebooks/average_causal_effects.ipynb`, `read_knowlege`):
the middle-subject and further tokens are pooled token by token (a prompt with three middle
tokens gives three samples), the first and last subject tokens are taken at the subject's first
and last position even when they are the same token (a one-token subject is in both), and the
last token is always the prompt's last. Its middle and further rows are therefore not averages
over prompts; its counts are token rows, and the t interval treats them as independent (they
are not, within a prompt), so it is narrower than it should be.
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
POOLINGS = ("prompt", "paper")


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


def paper_bucket_rows(n_tokens: int, subject_span: tuple[int, int]) -> list[list[int]]:
    """The positions each bucket takes from one prompt under the paper's pooling.

    As `read_knowlege` in the paper's notebook: first subject = the subject's first position,
    middle = the positions strictly between its first and last, last subject = its last
    position, first subsequent = the position after it (none if the subject ends the prompt),
    further = the positions between that and the last, last = the last position.
    """
    start, end = subject_span
    if not 0 <= start < end <= n_tokens:
        raise ValueError(f"subject span {subject_span} does not fit {n_tokens} tokens")
    last = n_tokens - 1
    return [
        [start],
        list(range(start + 1, end - 1)),
        [end - 1],
        [end] if end < n_tokens else [],
        list(range(end + 1, last)),
        [last],
    ]


def prompt_bucket_row(
    effect: np.ndarray, subject_span: tuple[int, int], bucket: int, pooling: str = "prompt"
) -> np.ndarray | None:
    """One prompt's (layers,) sample for `bucket`: the mean over the bucket's positions, as
    `average_by_bucket` pools them; None where the prompt has no such position."""
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    grid = np.asarray(effect, dtype=np.float64)
    if pooling == "paper":
        positions = paper_bucket_rows(grid.shape[0], subject_span)[bucket]
    else:
        buckets = bucket_positions(grid.shape[0], subject_span)
        positions = [p for p, b in enumerate(buckets) if b == bucket]
    return grid[positions].mean(axis=0) if positions else None


@dataclass
class BucketAverage:
    """Per bucket and layer: mean effect and confidence interval over the bucket's samples."""

    mean: np.ndarray  # (buckets, layers); NaN where no sample has the bucket
    low: np.ndarray  # (buckets, layers); NaN where the bucket has fewer than 2 samples
    high: np.ndarray
    count: np.ndarray  # (buckets,) samples: prompts that have the bucket (`paper`: rows)
    names: tuple[str, ...] = BUCKETS
    pooling: str = "prompt"


def average_by_bucket(
    effects: Sequence[torch.Tensor | np.ndarray],
    subject_spans: Sequence[tuple[int, int]],
    confidence: float = 0.95,
    pooling: str = "prompt",
) -> BucketAverage:
    """Average (tokens, layers) effect grids of many prompts per bucket, with t intervals.

    `pooling`: `prompt` (one sample per prompt and bucket) or `paper` (the paper's notebook; see
    the module's docstring).
    """
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    if len(effects) != len(subject_spans):
        raise ValueError("need one subject span per effect grid")
    samples: list[list[np.ndarray]] = [[] for _ in BUCKETS]
    n_layers = None
    for effect, span in zip(effects, subject_spans, strict=True):
        grid = np.asarray(torch.as_tensor(effect, dtype=torch.float64).cpu())
        if grid.ndim != 2 or (n_layers is not None and grid.shape[1] != n_layers):
            raise ValueError("effects must be (tokens, layers) grids with the same layer count")
        n_layers = grid.shape[1]
        if pooling == "paper":
            for bucket, positions in enumerate(paper_bucket_rows(grid.shape[0], span)):
                samples[bucket].extend(grid[positions])
            continue
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
    return BucketAverage(mean, low, high, count, pooling=pooling)
