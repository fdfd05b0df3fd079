"""Weight updates: how an edit is held, applied, undone, or applied to one batch row only.

An update changes the (out, in) weight W of the MLP output projection at one layer. A rank-one
update (ROME) is held as two vectors with ΔW = left ⊗ right: `left` lives in the output space,
`right` in the key space. It is applied to the weights in place (`apply_update`, restored
bit-for-bit by `preserved_weights` / `edited`), or added per batch row by a forward hook
(`PerExampleEdits`): x ↦ W x + (x · right) left for that row only, so a batch of cases can each
be scored under its own edit without copying weights.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from pipeline.core.models import LoadedModel


@dataclass
class RankOneUpdate:
    """ΔW = left ⊗ right for the (out, in) weight of `mlp_out` at `layer`."""

    layer: int
    left: torch.Tensor  # (out,)
    right: torch.Tensor  # (in,)

    def matrix(self) -> torch.Tensor:
        return torch.outer(self.left, self.right)


@torch.no_grad()
def apply_update(lm: LoadedModel, update: RankOneUpdate) -> None:
    """W += left ⊗ right in place; the (out, in) view makes GPT-2's transposed Conv1D right."""
    weight = lm.mlp_out_weight(update.layer)
    weight.add_(torch.outer(update.left, update.right).to(weight.device, weight.dtype))


@contextlib.contextmanager
def preserved_weights(lm: LoadedModel, layers: Sequence[int]) -> Iterator[None]:
    """Copy the projections' weights of `layers` and put them back bit-for-bit on exit."""
    saved = {
        layer % lm.n_layers: lm.mlp_out_weight(layer).detach().clone() for layer in set(layers)
    }
    try:
        yield
    finally:
        with torch.no_grad():
            for layer, original in saved.items():
                lm.mlp_out_weight(layer).copy_(original)


@contextlib.contextmanager
def edited(lm: LoadedModel, updates: Sequence[RankOneUpdate]) -> Iterator[LoadedModel]:
    """The model with `updates` applied to its weights; restored exactly afterwards."""
    with preserved_weights(lm, [u.layer for u in updates]):
        for update in updates:
            apply_update(lm, update)
        yield lm


class PerExampleEdits:
    """Forward hooks so row b of a batch sees its own updates, without touching the weights.

    `updates_per_row[b]` is None, one update, or a list of updates for row b; the hook adds
    (x · right) left to the projection's output for those rows only, and leaves the other rows
    bitwise unchanged. Use as a context manager around forward passes (or generate) whose batch
    has exactly len(updates_per_row) rows; `set_rows` swaps in the next batch's updates.
    """

    def __init__(
        self,
        lm: LoadedModel,
        updates_per_row: Sequence[RankOneUpdate | Sequence[RankOneUpdate] | None],
    ):
        self.lm = lm
        self.handles: list = []
        self.set_rows(updates_per_row)

    def set_rows(self, updates_per_row) -> None:
        self.n_rows = len(updates_per_row)
        by_layer: dict[int, tuple[list, list, list]] = {}
        for row, updates in enumerate(updates_per_row):
            if updates is None:
                continue
            if isinstance(updates, RankOneUpdate):
                updates = [updates]
            for update in updates:
                entry = by_layer.setdefault(update.layer % self.lm.n_layers, ([], [], []))
                entry[0].append(row)
                entry[1].append(update.left)
                entry[2].append(update.right)
        device = self.lm.device
        self.by_layer = {
            layer: (
                torch.as_tensor(rows, device=device),
                torch.stack(lefts).to(device),
                torch.stack(rights).to(device),
            )
            for layer, (rows, lefts, rights) in by_layer.items()
        }
        if self.handles:
            self._remove()
            self._register()

    def _hook(self, layer: int):
        def add_updates(module, args, output):
            x = args[0]
            if x.shape[0] != self.n_rows:
                raise ValueError(f"batch has {x.shape[0]} rows but {self.n_rows} were edited")
            rows, lefts, rights = self.by_layer[layer]
            coefficients = torch.einsum("rti,ri->rt", x[rows], rights.to(x.dtype))
            change = coefficients[..., None] * lefts.to(x.dtype)[:, None, :]
            return output.index_add(0, rows, change.to(output.dtype))

        return add_updates

    def _register(self) -> None:
        for layer in self.by_layer:
            module = self.lm.module("mlp_out", layer)
            self.handles.append(module.register_forward_hook(self._hook(layer)))

    def _remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def __enter__(self) -> PerExampleEdits:
        self._register()
        return self

    def __exit__(self, *exc) -> None:
        self._remove()


Update = RankOneUpdate  # the kinds of update editors return
