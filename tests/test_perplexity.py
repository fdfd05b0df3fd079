"""Perplexity on a fixed text: equal to a plain loop, changed by an edit, and its interval."""

from __future__ import annotations

import math

import pytest
import torch

from metrics import perplexity as ppl
from pipeline.core.editing.updates import RankOneUpdate
from pipeline.core.perplexity import token_windows, window_nlls
from pipeline.data.corpus import read_sample
from tests.conftest import tiny_model

TEXTS = list(read_sample(part="held_out"))[:40]


@pytest.fixture(scope="module", params=["tiny-gpt2", "tiny-llama"])
def lm(request):
    return tiny_model(request.param)


def plain_perplexity(lm, texts, max_tokens, window):
    """The definition, one token at a time: the text joined by blank lines, tokenized, cut,
    windows of `window` tokens (BOS first where the tokenizer adds one), each token after a
    window's first predicted from the window before it; exp of the mean over every token."""
    ids = lm.tokenizer("\n\n".join(t for t in texts if t.strip()), add_special_tokens=False)
    stream = ids["input_ids"][:max_tokens]
    bos = (
        [lm.tokenizer.bos_token_id]
        if lm.tokenizer("a")["input_ids"][0] == (lm.tokenizer.bos_token_id)
        and len(lm.tokenizer("a")["input_ids"]) > 1
        else []
    )
    body = window - len(bos)
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(stream) - body + 1, body):
            piece = torch.tensor([bos + stream[start : start + body]])
            logits = lm.model(input_ids=piece).logits[0].double()
            for t in range(1, piece.shape[1]):
                total -= torch.log_softmax(logits[t - 1], -1)[piece[0, t]].item()
                count += 1
    return math.exp(total / count), count


def test_perplexity_equals_a_plain_loop(lm):
    windows = token_windows(lm.tokenizer, TEXTS, max_tokens=700, window=64)
    assert len(windows) >= 10 and {len(w) for w in windows} == {64}
    measured = ppl.perplexity(window_nlls(lm, windows, batch_size=3), 63)
    expected, tokens = plain_perplexity(lm, TEXTS, 700, 64)
    assert measured["tokens"] == tokens == len(windows) * 63
    # float32 logits against float64 ones, 63 tokens a window: a relative 1e-5 on the NLL.
    assert measured["mean"] == pytest.approx(expected, rel=1e-5)
    assert measured["low"] < measured["mean"] < measured["high"]


def test_an_update_changes_the_perplexity_and_the_weights_come_back(lm):
    windows = token_windows(lm.tokenizer, TEXTS, max_tokens=400, window=32)
    before = lm.mlp_out_weight(1).clone()
    generator = torch.Generator().manual_seed(0)
    out, inside = lm.mlp_out_weight(1).shape
    update = RankOneUpdate(
        1, torch.randn(out, generator=generator), torch.randn(inside, generator=generator)
    )
    plain = window_nlls(lm, windows)
    under = window_nlls(lm, windows, [update])
    assert torch.equal(lm.mlp_out_weight(1), before)  # restored bit for bit
    assert abs(sum(under) - sum(plain)) > 1e-3
    with torch.no_grad():  # the same as writing it into the weights by hand
        lm.mlp_out_weight(1).add_(update.matrix())
        try:
            written = window_nlls(lm, windows)
        finally:
            lm.mlp_out_weight(1).copy_(before)
    assert written == pytest.approx(under, abs=1e-6)


def test_the_interval_is_student_t_over_windows_exponentiated():
    nlls = [2.0, 2.2, 1.9, 2.1, 2.3]
    mean = sum(nlls) / 5
    sd = math.sqrt(sum((x - mean) ** 2 for x in nlls) / 4)
    half = 2.7764451051977987 * sd / math.sqrt(5)  # t(0.975, 4)
    got = ppl.perplexity(nlls, 10)
    assert got["mean"] == pytest.approx(math.exp(mean))
    assert got["low"] == pytest.approx(math.exp(mean - half))
    assert got["high"] == pytest.approx(math.exp(mean + half))
    assert got["n"] == 5 and got["tokens"] == 50
    edits = ppl.over_edits([nlls, [x + 1 for x in nlls]], 10)
    assert edits["mean"] == pytest.approx(math.exp(mean + 0.5)) and edits["edits"] == 2
    assert edits["per_edit"] == pytest.approx([math.exp(mean), math.exp(mean + 1)])
    assert edits["high"] - edits["low"] == pytest.approx(
        math.exp(mean + 0.5 + half) - math.exp(mean + 0.5 - half)
    )


def test_too_short_a_text_is_a_clear_error(lm):
    with pytest.raises(ValueError, match="at least 2"):
        token_windows(lm.tokenizer, TEXTS, max_tokens=10, window=1)
    assert token_windows(lm.tokenizer, ["Short."], max_tokens=10, window=64) == []
    with pytest.raises(ValueError, match="no perplexity windows"):
        window_nlls(lm, [])
