"""Causal tracing: the fast engine against the hook-based reference, seeding, aggregation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from scipy import stats

from pipeline.core.models import load_model
from pipeline.core.patching import (
    BUCKETS,
    KINDS,
    POOLINGS,
    Readout,
    average_by_bucket,
    bucket_positions,
    embedding_std,
    make_noise,
    paper_bucket_rows,
    prompt_bucket_row,
    reference,
    resolve_noise,
    trace,
    trace_all_kinds,
    trace_severed,
    window_layers,
)
from pipeline.core.tokens import encode, subject_span

ROOT = Path(__file__).resolve().parents[1]
PROMPT, SUBJECT = "The mother tongue of Danielle Darrieux is", "Danielle Darrieux"
# A short prompt SmolLM2 knows (" Paris"), for comparisons with the one-pass-per-cell reference.
SHORT_PROMPT, SHORT_SUBJECT = "The Eiffel Tower is in", "Eiffel Tower"
TOLERANCE = 1e-4


def load(name: str, dtype: str = "float32"):
    spec = yaml.safe_load((ROOT / "conf" / "model" / f"{name}.yaml").read_text())
    return load_model(spec, cache_dir=ROOT / ".cache", seed=0, dtype=dtype)


@pytest.fixture(autouse=True)
def one_thread():
    """These tests run thousands of small forward passes, where thread hand-offs cost about as
    much as they save, and many times more when other jobs share the CPU: use one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=["tiny-gpt2", "tiny-gptj", "tiny-neox", "tiny-llama"])
def tiny(request):
    lm = load(request.param)
    # Random weights predict an almost uniform distribution. Sharper logits make restorations
    # move P(answer) by far more than the tolerance, so a wrong engine cannot pass by accident.
    with torch.no_grad():
        lm.module("final_norm").weight.mul_(30)
    return lm


@pytest.fixture(scope="session")
def smollm2():
    return load("smollm2-135m")


def greedy(lm, ids: list[int], n: int = 1) -> list[int]:
    ids = list(ids)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(lm.model(torch.tensor([ids], device=lm.device)).logits[0, -1].argmax()))
    return ids[-n:]


def case(lm, copies=3, answer_tokens=1, prompt=PROMPT, subject=SUBJECT):
    ids = encode(lm.tokenizer, prompt)
    span = subject_span(lm.tokenizer, prompt, subject)
    noise = resolve_noise(lm, ids, span, samples=copies, seed=0)
    return ids, span, greedy(lm, ids, answer_tokens), noise


def assert_same_trace(fast, ref):
    assert fast.clean == pytest.approx(ref.clean, abs=TOLERANCE)
    assert fast.corrupted == pytest.approx(ref.corrupted, abs=TOLERANCE)
    assert fast.restored.shape == ref.restored.shape
    torch.testing.assert_close(fast.restored, ref.restored, atol=TOLERANCE, rtol=0)


def test_fast_matches_reference_on_tiny_models(tiny):
    ids, span, answer, noise = case(tiny)
    fast = trace_all_kinds(tiny, ids, span, answer, noise=noise)
    ref = trace_all_kinds(tiny, ids, span, answer, noise=noise, engine="reference")
    for kind in KINDS:
        assert_same_trace(fast[kind], ref[kind])
        # The comparison means something only if restorations move P(answer) well beyond it.
        assert ref[kind].effect.abs().max() > 50 * TOLERANCE, kind
        # Before the subject nothing is corrupted, so restoring there changes nothing.
        assert torch.all(fast[kind].restored[: span[0]] == fast[kind].corrupted)
    # A window smaller than the stack: rows start mid-stack and share clipped windows' layers.
    for kind in ("mlp", "attn"):
        small = trace(tiny, ids, span, answer, kind=kind, window=3, noise=noise)
        assert_same_trace(
            small,
            trace(tiny, ids, span, answer, kind=kind, window=3, noise=noise, engine="reference"),
        )


def test_fast_matches_reference_on_whole_answer():
    lm = load("tiny-llama")
    with torch.no_grad():
        lm.module("final_norm").weight.mul_(30)
    ids, span, answer, noise = case(lm, answer_tokens=3)
    options = dict(noise=noise, whole_answer=True, kinds=("hidden", "attn"))
    fast = trace_all_kinds(lm, ids, span, answer, **options)
    ref = trace_all_kinds(lm, ids, span, answer, engine="reference", **options)
    first_token = trace(lm, ids, span, answer, noise=noise)
    for kind in ("hidden", "attn"):
        assert_same_trace(fast[kind], ref[kind])
        assert fast[kind].restored.shape == (len(ids), lm.n_layers)
    assert abs(fast["hidden"].clean - first_token.clean) > 1e-3  # it reads more than 1 token


def test_fast_runs_in_bfloat16():
    """As on a GPU: the same numbers up to bf16 rounding (batches of other shapes round apart)."""
    lm = load("tiny-llama", dtype="bfloat16")
    with torch.no_grad():
        lm.module("final_norm").weight.mul_(30)
    ids, span, answer, noise = case(lm)
    fast = trace_all_kinds(lm, ids, span, answer, noise=noise)
    ref = trace_all_kinds(lm, ids, span, answer, noise=noise, engine="reference")
    for kind in KINDS:
        assert fast[kind].restored.dtype == torch.float32
        torch.testing.assert_close(fast[kind].restored, ref[kind].restored, atol=2e-2, rtol=0)
        # Effects larger than the tolerance, so the comparison cannot pass by accident (the MLP
        # kind's peak is 0.0385 with torch 2.13's CPU bf16 kernels).
        assert ref[kind].effect.abs().max() > 3e-2


def test_severed_fast_matches_reference(tiny):
    ids, span, answer, noise = case(tiny)
    fast = trace_severed(tiny, ids, span, answer, noise=noise)
    ref = trace_severed(tiny, ids, span, answer, noise=noise, engine="reference")
    assert fast.token == ref.token == span[1] - 1
    for name in ("none", "mlp", "attn"):
        torch.testing.assert_close(fast.restored[name], ref.restored[name], atol=TOLERANCE, rtol=0)
    # Severing nothing is the ordinary hidden trace at the last subject token...
    hidden = trace(tiny, ids, span, answer, noise=noise)
    torch.testing.assert_close(fast.restored["none"], hidden.restored[span[1] - 1])
    # ...and freezing later MLP/attn outputs does change the result below the top layer.
    for name in ("mlp", "attn"):
        assert (fast.restored[name] - fast.restored["none"])[:-1].abs().max() > 2 * TOLERANCE
        assert fast.restored[name][-1].item() == pytest.approx(
            fast.restored["none"][-1].item(), abs=1e-6
        )


def test_same_seed_same_result_bit_for_bit():
    lm = load("tiny-gpt2")
    ids, span, answer, _ = case(lm)
    first = trace(lm, ids, span, answer, kind="mlp", samples=4, seed=7)
    again = trace(lm, ids, span, answer, kind="mlp", samples=4, seed=7)
    other = trace(lm, ids, span, answer, kind="mlp", samples=4, seed=8)
    assert torch.equal(first.restored, again.restored)
    assert (first.clean, first.corrupted) == (again.clean, again.corrupted)
    assert not torch.equal(first.restored, other.restored)


def test_noise_is_checked_and_scaled():
    lm = load("tiny-llama")
    ids, span, answer, _ = case(lm)
    with pytest.raises(ValueError, match="noise must be"):
        trace(lm, ids, span, answer, noise=torch.zeros(3, span[1] - span[0] + 1, 64))
    generator = torch.Generator().manual_seed(0)
    gaussian = make_noise(generator, 50, 4, 64, scale=2.0)
    uniform = make_noise(generator, 50, 4, 64, scale=2.0, distribution="uniform")
    assert gaussian.shape == uniform.shape == (50, 4, 64)
    assert gaussian.std().item() == pytest.approx(2.0, rel=0.05)
    assert uniform.abs().max() <= 2.0 and uniform.std().item() == pytest.approx(
        2 / 3**0.5, rel=0.05
    )
    with pytest.raises(ValueError):
        make_noise(generator, 1, 1, 1, 1.0, distribution="laplace")


def test_embedding_std_is_over_subject_tokens():
    lm = load("tiny-llama")
    pairs = [(PROMPT, SUBJECT), ("Vinson Massif is located in the continent of", "Vinson Massif")]
    rows = []
    for prompt, subject in pairs:
        start, end = subject_span(lm.tokenizer, prompt, subject)
        rows.append(lm.module("embed").weight[encode(lm.tokenizer, prompt)[start:end]])
    expected = torch.cat(rows).std().item()
    assert embedding_std(lm, pairs) == pytest.approx(expected, rel=1e-6)


def test_window_layers_match_the_original_range():
    assert window_layers(0, 10, 30) == range(0, 5)
    assert window_layers(15, 10, 30) == range(10, 20)
    assert window_layers(29, 10, 30) == range(24, 30)
    assert window_layers(7, 1, 30) == range(7, 8)
    assert window_layers(7, 3, 30) == range(6, 9)
    with pytest.raises(ValueError):
        window_layers(0, 0, 30)


# ---------------------------------------------------------------------------------------------
# Aggregation

F, M, LS, FS, FU, LA = range(6)


@pytest.mark.parametrize(
    ("n_tokens", "span", "expected"),
    [
        (10, (2, 5), [-1, -1, F, M, LS, FS, FU, FU, FU, LA]),
        (6, (3, 4), [-1, -1, -1, LS, FS, LA]),  # one-token subject: only "last subject"
        (5, (1, 5), [-1, F, M, M, LS]),  # subject ends the prompt: it stays the subject
        (3, (0, 2), [F, LS, LA]),  # first subsequent token is the last token
        (1, (0, 1), [LS]),
    ],
)
def test_bucket_positions(n_tokens, span, expected):
    assert bucket_positions(n_tokens, span) == expected


def test_bucket_positions_rejects_bad_spans():
    for span in [(3, 3), (-1, 2), (2, 7)]:
        with pytest.raises(ValueError):
            bucket_positions(6, span)


def test_average_by_bucket_counts_prompts_per_bucket():
    generator = np.random.default_rng(0)
    spans = [(2, 5), (0, 3), (1, 4), (3, 4)]  # the last prompt: 1-token subject, 6 tokens
    lengths = [10, 9, 8, 6]
    effects = [torch.tensor(generator.normal(size=(n, 3))) for n in lengths]
    result = average_by_bucket(effects, spans)
    assert result.names == BUCKETS
    # The 6-token prompt has no first/middle subject token and no "further" token.
    assert result.count.tolist() == [3, 3, 4, 4, 3, 4]

    # "further": one sample per prompt, the mean over that prompt's further positions.
    per_prompt = []
    for effect, span in zip(effects, spans, strict=True):
        rows = [p for p, b in enumerate(bucket_positions(len(effect), span)) if b == FU]
        if rows:
            per_prompt.append(effect[rows].mean(0).numpy())
    per_prompt = np.stack(per_prompt)
    np.testing.assert_allclose(result.mean[FU], per_prompt.mean(0))
    low, high = stats.t.interval(
        0.95, len(per_prompt) - 1, loc=per_prompt.mean(0), scale=stats.sem(per_prompt, axis=0)
    )
    np.testing.assert_allclose(result.low[FU], low)
    np.testing.assert_allclose(result.high[FU], high)


def test_average_by_bucket_single_prompt_has_no_interval():
    result = average_by_bucket([np.ones((4, 2))], [(1, 2)])
    assert result.count.tolist() == [0, 0, 1, 1, 0, 1]  # 4 tokens: no "further" token
    assert np.isnan(result.mean[F]).all() and np.isnan(result.low[LS]).all()
    np.testing.assert_array_equal(result.mean[LS], [1.0, 1.0])


@pytest.mark.parametrize(
    ("n_tokens", "span", "expected"),
    [
        (10, (2, 5), [[2], [3], [4], [5], [6, 7, 8], [9]]),
        (6, (3, 4), [[3], [], [3], [4], [], [5]]),  # one-token subject: first and last
        (5, (1, 5), [[1], [2, 3], [4], [], [], [4]]),  # subject ends the prompt
        (3, (0, 2), [[0], [], [1], [2], [], [2]]),  # first subsequent is the last token
    ],
)
def test_paper_bucket_rows_follow_the_notebook(n_tokens, span, expected):
    assert paper_bucket_rows(n_tokens, span) == expected


def test_paper_pooling_pools_tokens_not_prompt_means():
    # Prompt A: middle tokens with effects 1, 1, 1; prompt B: one middle token with effect 5.
    a = np.zeros((7, 1))
    a[2:5] = 1.0  # span (1, 6): first 1, middle 2-4, last 5
    b = np.zeros((5, 1))
    b[2] = 5.0  # span (1, 4): first 1, middle 2, last 3
    spans = [(1, 6), (1, 4)]
    by_prompt = average_by_bucket([a, b], spans)
    paper = average_by_bucket([a, b], spans, pooling="paper")
    assert by_prompt.mean[M, 0] == pytest.approx(3.0)  # (1 + 5) / 2 prompts
    assert paper.mean[M, 0] == pytest.approx(2.0)  # (1 + 1 + 1 + 5) / 4 tokens
    assert paper.count[M] == 4 and by_prompt.count[M] == 2
    assert paper.pooling == "paper" and by_prompt.pooling == "prompt"
    # A one-token subject counts in the first and the last subject bucket under the paper's.
    one = average_by_bucket([np.arange(4.0)[:, None]], [(1, 2)], pooling="paper")
    assert one.mean[F, 0] == one.mean[LS, 0] == 1.0
    with pytest.raises(ValueError, match="pooling"):
        average_by_bucket([a], [(1, 6)], pooling="tokens")


# ---------------------------------------------------------------------------------------------
# The real model


@pytest.mark.slow
def test_smollm2_fast_matches_reference(smollm2):
    """The full grid for `hidden`; `mlp` at the last subject token and `attn` at the last token
    (where the paper finds their effects). Each reference cell costs a full forward pass."""
    ids, span, answer, noise = case(smollm2, 2, prompt=SHORT_PROMPT, subject=SHORT_SUBJECT)
    assert smollm2.tokenizer.decode(answer) == " Paris" and span[0] > 0
    fast = trace_all_kinds(smollm2, ids, span, answer, noise=noise)
    readout = Readout.build(ids, answer)
    for kind, tokens in [("hidden", None), ("mlp", [span[1] - 1]), ("attn", [len(ids) - 1])]:
        clean, corrupted, grid = reference.trace_grid(
            smollm2, readout, span, noise, kind, window=10, tokens=tokens
        )
        assert fast[kind].clean == pytest.approx(clean, abs=TOLERANCE)
        assert fast[kind].corrupted == pytest.approx(corrupted, abs=TOLERANCE)
        checked = ~grid.isnan()
        assert checked.sum() == (len(ids) if tokens is None else len(tokens)) * smollm2.n_layers
        torch.testing.assert_close(
            fast[kind].restored[checked], grid[checked], atol=TOLERANCE, rtol=0
        )
        assert (grid[checked] - corrupted).abs().max() > 50 * TOLERANCE, kind


@pytest.mark.slow
def test_smollm2_severed_matches_reference(smollm2):
    ids, span, answer, noise = case(smollm2, 2, prompt=SHORT_PROMPT, subject=SHORT_SUBJECT)
    fast = trace_severed(smollm2, ids, span, answer, noise=noise)
    layers = [0, 5, 10, 15, 20, 25]
    _, _, ref = reference.trace_severed(smollm2, Readout.build(ids, answer), span, noise, layers)
    for name in ("none", "mlp", "attn"):
        torch.testing.assert_close(
            fast.restored[name][layers], ref[name][layers], atol=TOLERANCE, rtol=0
        )


@pytest.mark.slow
def test_smollm2_corrupting_the_subject_hides_the_fact(smollm2):
    records = json.loads((ROOT / "data" / "samples" / "known_1000_sample.json").read_text())
    scale = 3 * embedding_std(smollm2, [(r["prompt"], r["subject"]) for r in records[:50]])
    ids = encode(smollm2.tokenizer, PROMPT)
    span = subject_span(smollm2.tokenizer, PROMPT, SUBJECT)
    result = trace(smollm2, ids, span, greedy(smollm2, ids), samples=5, scale=scale, seed=0)
    assert result.clean > 0.1 and result.clean > 5 * result.corrupted
    # Restoring the whole final state at the last token gives back the clean prediction.
    assert result.restored[-1, -1].item() == pytest.approx(result.clean, abs=TOLERANCE)
    assert not math.isnan(result.effect.max().item()) and result.effect.max() > 0.1


@pytest.mark.parametrize("pooling", POOLINGS)
def test_prompt_bucket_rows_average_to_the_bucket_average(pooling):
    """One prompt's row per bucket is the sample `average_by_bucket` pools (for the paper's
    pooling, in the buckets that take one row per prompt)."""
    generator = np.random.default_rng(0)
    spans = [(0, 1), (1, 3), (2, 5), (1, 6)]  # one-token subject, ..., subject ending the prompt
    effects = [generator.normal(size=(6, 3)) for _ in spans]
    average = average_by_bucket(effects, spans, pooling=pooling)
    buckets = range(len(BUCKETS)) if pooling == "prompt" else (2, 5)  # last subject, last
    for bucket in buckets:
        rows = [
            prompt_bucket_row(e, s, bucket, pooling) for e, s in zip(effects, spans, strict=True)
        ]
        rows = [r for r in rows if r is not None]
        assert len(rows) == average.count[bucket]
        if rows:
            np.testing.assert_allclose(np.mean(rows, axis=0), average.mean[bucket])
    # the prompt pooling gives a subject that ends the prompt no last-token row
    assert prompt_bucket_row(effects[3], (1, 6), BUCKETS.index("last")) is None
