"""Causal tracing (Meng et al. 2022, section 2): which hidden states carry a factual association.

The subject's input embeddings are corrupted with noise (S copies); then one clean state at a time
(token t, layer l) is restored and the answer's probability measured. Two engines compute the
same numbers: `reference` (a full forward pass with hooks per cell, as the original code) and
`fast` (cached runs, restored runs started at the patched layer and token; see `fast.py`). A
third, `attribution`, ESTIMATES them to first order from one forward and one backward pass
(attribution patching; see `attribution.py`).

    ids = encode(lm.tokenizer, prompt)
    span = subject_span(lm.tokenizer, prompt, subject)
    result = trace(lm, ids, span, answer_ids, kind="mlp", scale=3 * embedding_std(lm, pairs))
    result.effect  # (tokens, layers) indirect effect
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from pipeline.core.models import LoadedModel
from pipeline.core.patching import reference
from pipeline.core.patching.aggregate import (
    BUCKETS,
    POOLINGS,
    BucketAverage,
    average_by_bucket,
    bucket_positions,
    paper_bucket_rows,
    prompt_bucket_row,
)
from pipeline.core.patching.attribution import LINEARIZE, AttributionTracer
from pipeline.core.patching.common import (
    DISTRIBUTIONS,
    KINDS,
    SEVERED,
    Readout,
    SeveredResult,
    TraceResult,
    embedding_std,
    hidden_size,
    make_noise,
    window_layers,
)
from pipeline.core.patching.fast import FastTracer

ENGINES = ("fast", "reference", "attribution")
ESTIMATES = ("attribution",)  # engines whose grids are estimates, not restored runs

__all__ = [
    "AttributionTracer",
    "BUCKETS",
    "ESTIMATES",
    "LINEARIZE",
    "DISTRIBUTIONS",
    "ENGINES",
    "KINDS",
    "SEVERED",
    "BucketAverage",
    "FastTracer",
    "Readout",
    "SeveredResult",
    "TraceOptions",
    "TraceResult",
    "average_by_bucket",
    "bucket_positions",
    "paper_bucket_rows",
    "prompt_bucket_row",
    "POOLINGS",
    "embedding_std",
    "make_noise",
    "reference",
    "resolve_noise",
    "trace",
    "trace_all_kinds",
    "trace_severed",
    "window_layers",
]


@torch.no_grad()
def resolve_noise(
    lm: LoadedModel,
    prompt_ids: Sequence[int],
    subject_span: tuple[int, int],
    *,
    noise: torch.Tensor | None = None,
    samples: int = 10,
    scale: float | None = None,
    distribution: str = "gaussian",
    seed: int = 0,
) -> torch.Tensor:
    """The noise a trace uses: `noise` if given (checked), else drawn from a generator seeded `seed`.

    Without `scale`, the scale is 3 x the std of this prompt's subject-token embeddings; the paper
    uses 3 x the std over the dataset's subjects: pass `scale=3 * embedding_std(lm, pairs)`.
    """
    start, end = subject_span
    if not 0 <= start < end <= len(prompt_ids):
        raise ValueError(f"subject span {subject_span} does not fit {len(prompt_ids)} tokens")
    width = hidden_size(lm)
    if noise is not None:
        if noise.ndim != 3 or tuple(noise.shape[1:]) != (end - start, width):
            raise ValueError(
                f"noise must be (copies, {end - start}, {width}), got {tuple(noise.shape)}"
            )
        return noise
    if scale is None:
        ids = torch.tensor(list(prompt_ids)[start:end], device=lm.device)
        scale = 3 * lm.module("embed")(ids).float().std().item()
    generator = torch.Generator().manual_seed(seed)
    return make_noise(generator, samples, end - start, width, scale, distribution)


@dataclass(frozen=True)
class TraceOptions:
    """How a trace corrupts and restores (the `trace:` config section holds the same names).

    `scale=None` takes 3 x the std of this prompt's subject-token embeddings; the paper uses 3 x
    the std over the data set's subjects: pass `scale=3 * embedding_std(lm, pairs)`."""

    samples: int = 10  # S corrupted copies
    scale: float | None = None
    distribution: str = "gaussian"  # gaussian | uniform
    seed: int = 0
    window: int = 10  # layers restored together for the mlp / attn kinds
    whole_answer: bool = False  # False: P(first answer token), as in the paper
    engine: str = "fast"  # fast | reference | attribution (an estimate)
    batch_size: int = 512  # rows per forward pass (fast engine)
    linearize: str = "prob"  # attribution engine: prob | logprob (see attribution.py)

    def __post_init__(self):
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got '{self.engine}'")
        if self.linearize not in LINEARIZE:
            raise ValueError(f"linearize must be one of {LINEARIZE}, got '{self.linearize}'")

    @classmethod
    def of(cls, options: TraceOptions | None = None, **overrides) -> TraceOptions:
        """`options` (or the defaults) with `overrides` (any field by name) replaced."""
        return dataclasses.replace(options or cls(), **overrides)


def _prepare(
    lm, prompt_ids, subject_span, answer_ids, options: TraceOptions, noise
) -> tuple[tuple[int, int], torch.Tensor, Readout]:
    """What every trace needs: a checked span, the noise, and the answer read-out."""
    span = (int(subject_span[0]), int(subject_span[1]))
    noise = resolve_noise(
        lm,
        prompt_ids,
        span,
        noise=noise,
        samples=options.samples,
        scale=options.scale,
        distribution=options.distribution,
        seed=options.seed,
    )
    return span, noise, Readout.build(prompt_ids, answer_ids, options.whole_answer)


def _tracer(lm, readout, span, noise, options: TraceOptions):
    """The engine's cached runs (None for the reference, which runs each cell afresh)."""
    if options.engine == "fast":
        return FastTracer(lm, readout, span, noise, options.batch_size)
    if options.engine == "attribution":
        return AttributionTracer(lm, readout, span, noise, options.linearize)
    return None


def trace_all_kinds(
    lm: LoadedModel,
    prompt_ids: Sequence[int],
    subject_span: tuple[int, int],
    answer_ids: Sequence[int],
    options: TraceOptions | None = None,
    *,
    kinds: Sequence[str] = KINDS,
    noise: torch.Tensor | None = None,
    **overrides,
) -> dict[str, TraceResult]:
    """Trace several kinds on the same noise; the fast engine shares its clean/corrupted runs.

    `overrides` replace fields of `options` by name (`samples=3, seed=1`); `noise` (copies,
    subject tokens, hidden size), if given, is used instead of a draw."""
    unknown = set(kinds) - set(KINDS)
    if unknown:
        raise ValueError(f"kinds must be among {KINDS}, got {sorted(unknown)}")
    options = TraceOptions.of(options, **overrides)
    span, noise, readout = _prepare(lm, prompt_ids, subject_span, answer_ids, options, noise)
    results = {}
    tracer = _tracer(lm, readout, span, noise, options)
    window = options.window
    for kind in kinds:
        if tracer is not None:
            clean, corrupted, grid = tracer.clean, tracer.corrupted, tracer.grid(kind, window)
        else:
            clean, corrupted, grid = reference.trace_grid(lm, readout, span, noise, kind, window)
        results[kind] = TraceResult(kind, window, clean, corrupted, grid, span, readout.targets)
    return results


def trace(
    lm: LoadedModel,
    prompt_ids: Sequence[int],
    subject_span: tuple[int, int],
    answer_ids: Sequence[int],
    options: TraceOptions | None = None,
    *,
    kind: str = "hidden",
    **overrides,
) -> TraceResult:
    """Causal trace of one kind (hidden, mlp or attn); arguments as in `trace_all_kinds`."""
    results = trace_all_kinds(
        lm, prompt_ids, subject_span, answer_ids, options, kinds=(kind,), **overrides
    )
    return results[kind]


def trace_severed(
    lm: LoadedModel,
    prompt_ids: Sequence[int],
    subject_span: tuple[int, int],
    answer_ids: Sequence[int],
    options: TraceOptions | None = None,
    *,
    noise: torch.Tensor | None = None,
    **overrides,
) -> SeveredResult:
    """Hidden-state effect at the last subject token, per layer, with MLP / attn paths severed."""
    options = TraceOptions.of(options, **overrides)
    span, noise, readout = _prepare(lm, prompt_ids, subject_span, answer_ids, options, noise)
    tracer = _tracer(lm, readout, span, noise, options)
    if tracer is not None:
        clean, corrupted, restored = tracer.clean, tracer.corrupted, tracer.severed()
    else:
        clean, corrupted, restored = reference.trace_severed(lm, readout, span, noise)
    return SeveredResult(span[1] - 1, clean, corrupted, restored)
