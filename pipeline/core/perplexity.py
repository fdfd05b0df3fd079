"""Perplexity of a model on a fixed text: what an edit does to text it is not about.

The text's passages are tokenized in order, joined by a blank line ("\\n\\n"), and cut to their
first `max_tokens` tokens; these are split into non-overlapping windows of `window` tokens, the
last, shorter remainder dropped, so every window predicts the same number of tokens. A window is
run alone (with the BOS token first where the tokenizer puts one before a prompt) and every token
but its first is predicted from those before it in the window:

    NLL_w = -(1 / (T - 1)) Σ_{t=2..T} log p(x_t | x_1..x_{t-1}),    perplexity = exp(mean_w NLL_w)

which, the windows being of equal length, is exp of the mean NLL over all predicted tokens.
Departure from the sliding-window perplexity of Hugging Face's guide and lm-eval (each window's
first tokens see the previous window as context): here no context crosses a window, so early
tokens see less and the value is higher, equally for every editor; the windows are separate
samples for the interval (`metrics.perplexity`).

Under edits, `updates` are applied to the weights the way the mass and sequential scoring apply
them (`edited`: added in place, restored bit for bit afterwards).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from pipeline.core.editing.updates import Updates, edited
from pipeline.core.models import LoadedModel


def token_windows(
    tokenizer, texts: Iterable[str], *, max_tokens: int, window: int
) -> list[list[int]]:
    """The first `max_tokens` tokens of the passages, joined by a blank line, in windows of
    `window` tokens (each opening with BOS where the tokenizer adds one)."""
    if window < 2:
        raise ValueError(f"a perplexity window needs at least 2 tokens, got {window}")
    bos = _bos(tokenizer)
    stream: list[int] = []
    for text in texts:
        if len(stream) >= max_tokens:
            break
        if text.strip():
            joined = ("\n\n" if stream else "") + text
            stream += tokenizer(joined, add_special_tokens=False)["input_ids"]
    stream = stream[:max_tokens]
    body = window - len(bos)
    return [bos + stream[i : i + body] for i in range(0, len(stream) - body + 1, body)]


def _bos(tokenizer) -> list[int]:
    """[BOS] if the tokenizer puts it before a prompt, else []."""
    with_special = tokenizer("a")["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    return with_special[:1] if len(with_special) > len(without) else []


@torch.no_grad()
def window_nlls(
    lm: LoadedModel,
    windows: Sequence[Sequence[int]],
    updates: Sequence[Updates] = (),
    *,
    batch_size: int = 4,
) -> list[float]:
    """Mean NLL of each window's tokens after the first, under `updates` (none: the model as
    it is). Windows are of equal length: no padding. The logits are formed one window at a
    time (a window of 512 tokens over a 49k vocabulary is 100 MB in float32)."""
    if not windows:
        raise ValueError("no perplexity windows: the text has fewer tokens than one window")
    unembed = lm.module("unembed")
    nlls: list[float] = []
    with edited(lm, updates):
        for start in range(0, len(windows), batch_size):
            ids = torch.tensor(windows[start : start + batch_size], device=lm.device)
            hidden = lm.model.base_model(input_ids=ids).last_hidden_state
            for row in range(ids.shape[0]):
                log_probs = unembed(hidden[row, :-1]).float().log_softmax(-1)
                picked = log_probs.gather(-1, ids[row, 1:, None]).squeeze(-1)
                nlls.append(float(-picked.double().mean()))
    return nlls
