"""The plain reference: one full forward pass per restored (token, layer), as the original code.

Each pass runs 1 + S rows of the same sequence: row 0 stays clean, rows 1..S get noise on the
subject embeddings (a hook on the embedding module), and hooks copy row 0's state at token t into
the other rows. Slow, and obviously right: the fast engine is checked against it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pipeline.core.hooks import forward_hooks, main_output
from pipeline.core.models import LoadedModel
from pipeline.core.patching.common import (
    SEVERED,
    Readout,
    answer_prob,
    corrupt_embeddings,
    window_layers,
)


def _restore_from_row0(token: int):
    def hook(module, inputs, output):
        hidden = main_output(output)
        hidden[1:, token] = hidden[0, token]
        return output

    return hook


def _freeze(token: int, values: torch.Tensor):
    def hook(module, inputs, output):
        main_output(output)[1:, token] = values
        return output

    return hook


def _record(store: dict, key: int, token: int):
    def hook(module, inputs, output):
        store[key] = main_output(output)[1:, token].clone()

    return hook


def _probs(lm: LoadedModel, batch: torch.Tensor, readout: Readout) -> torch.Tensor:
    logits = lm.model(input_ids=batch, use_cache=False).logits
    return answer_prob(logits[:, list(readout.positions)], readout.targets)


def _batch(lm: LoadedModel, readout: Readout, copies: int) -> torch.Tensor:
    return torch.tensor([readout.sequence] * (1 + copies), device=lm.device)


@torch.no_grad()
def trace_grid(
    lm: LoadedModel,
    readout: Readout,
    span: tuple[int, int],
    noise: torch.Tensor,
    kind: str,
    window: int,
    tokens: Sequence[int] | None = None,
    layers: Sequence[int] | None = None,
) -> tuple[float, float, torch.Tensor]:
    """(clean prob, corrupted prob, (prompt tokens, layers) restored probs) by hooks.

    `tokens` / `layers` restrict the grid to a subset for spot checks (other cells are NaN).
    """
    n_layers = lm.n_layers
    batch = _batch(lm, readout, noise.shape[0])
    grid = torch.full((readout.n_prompt, n_layers), float("nan"))
    with corrupt_embeddings(lm, span, noise, first_row=1):
        base = _probs(lm, batch, readout)
        for token in range(readout.n_prompt) if tokens is None else tokens:
            for layer in range(n_layers) if layers is None else layers:
                if kind == "hidden":
                    modules = [lm.module("block", layer)]
                else:
                    modules = [lm.module(kind, j) for j in window_layers(layer, window, n_layers)]
                with forward_hooks((m, _restore_from_row0(token)) for m in modules):
                    grid[token, layer] = _probs(lm, batch, readout)[1:].mean()
    return base[0].item(), base[1:].mean().item(), grid


@torch.no_grad()
def trace_severed(
    lm: LoadedModel,
    readout: Readout,
    span: tuple[int, int],
    noise: torch.Tensor,
    layers: Sequence[int] | None = None,
) -> tuple[float, float, dict[str, torch.Tensor]]:
    """Restore block l's output at the last subject token with later MLP/attn outputs frozen.

    A first pass records the corrupted MLP and attention outputs at that token (the same noise as
    the restored runs; the original notebook drew fresh noise for it). `layers` restricts the
    restored layers for spot checks (others are NaN).
    """
    n_layers, token = lm.n_layers, span[1] - 1
    batch = _batch(lm, readout, noise.shape[0])
    corrupted_outputs = {"mlp": {}, "attn": {}}
    with corrupt_embeddings(lm, span, noise, first_row=1):
        recorders = [
            (lm.module(kind, j), _record(corrupted_outputs[kind], j, token))
            for kind in ("mlp", "attn")
            for j in range(n_layers)
        ]
        with forward_hooks(recorders):
            base = _probs(lm, batch, readout)
        restored = {name: torch.full((n_layers,), float("nan")) for name in SEVERED}
        for name in SEVERED:
            for layer in range(n_layers) if layers is None else layers:
                hooks = [(lm.module("block", layer), _restore_from_row0(token))]
                if name != "none":
                    hooks += [
                        (lm.module(name, j), _freeze(token, corrupted_outputs[name][j]))
                        for j in range(layer + 1, n_layers)
                    ]
                with forward_hooks(hooks):
                    restored[name][layer] = _probs(lm, batch, readout)[1:].mean()
    return base[0].item(), base[1:].mean().item(), restored
