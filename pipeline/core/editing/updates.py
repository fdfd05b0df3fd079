"""Weight updates: how an edit is held, applied, undone, or applied to one batch row only.

An update changes the (out, in) weight W of the MLP output projection at one layer, held in the
cheapest exact form: rank one (ROME: ΔW = left ⊗ right, `left` in the output space, `right` in
the key space), low rank (MEMIT and its successors: ΔW = left @ right, rank = the number of
requests written together) or dense (fine-tuning). An edit may change several layers: a list. It is applied to the weights in place (`apply_update`, restored
bit-for-bit by `preserved_weights` / `edited`), or added per batch row by a forward hook
(`PerExampleEdits`): x ↦ W x + (x · right) left for that row only, so a batch of cases can each
be scored under its own edit without copying weights.

An update with a NaN or infinite entry is the sign of a broken solve (a singular matrix), never
an edit: `apply_update` refuses it (`NonFiniteUpdate`), so it is neither written nor scored.
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

    def change(self, x: torch.Tensor) -> torch.Tensor:
        """ΔW x for inputs x (..., in): (..., out)."""
        return (x @ self.right.to(x.dtype))[..., None] * self.left.to(x.dtype)


@dataclass
class LowRankUpdate:
    """ΔW = left @ right, left (out, r), right (r, in): r requests written in one solve."""

    layer: int
    left: torch.Tensor  # (out, r)
    right: torch.Tensor  # (r, in)

    def matrix(self) -> torch.Tensor:
        return self.left @ self.right

    def change(self, x: torch.Tensor) -> torch.Tensor:
        return (x @ self.right.to(x.dtype).T) @ self.left.to(x.dtype).T


@dataclass
class DenseUpdate:
    """ΔW given whole (out, in), as fine-tuning produces it."""

    layer: int
    delta: torch.Tensor  # (out, in)

    def matrix(self) -> torch.Tensor:
        return self.delta

    def change(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.delta.to(x.dtype).T


Update = RankOneUpdate | LowRankUpdate | DenseUpdate
Updates = Update | Sequence[Update] | None  # what one edit changes: nothing, one layer, several


class NonFiniteUpdate(ValueError):
    """An update with NaN or infinite entries."""


def is_finite(update: Update) -> bool:
    """Whether every entry of ΔW's factors (or of a dense ΔW) is finite."""
    parts = (update.delta,) if isinstance(update, DenseUpdate) else (update.left, update.right)
    return all(bool(torch.isfinite(part).all()) for part in parts)


def check_finite(updates: Updates, what: str = "an update") -> None:
    """Raise `NonFiniteUpdate` naming `what` and the layers where an update is not finite."""
    bad = sorted({one.layer for one in as_list(updates) if not is_finite(one)})
    if bad:
        raise NonFiniteUpdate(f"{what} is not finite (NaN or inf) at layer {bad}")


def as_list(updates: Updates) -> list[Update]:
    if updates is None:
        return []
    return (
        [updates]
        if isinstance(updates, (RankOneUpdate, LowRankUpdate, DenseUpdate))
        else list(updates)
    )


@torch.no_grad()
def apply_update(lm: LoadedModel, update: Updates) -> None:
    """W += ΔW in place for each update; the (out, in) view makes GPT-2's transposed Conv1D right.
    A non-finite update is refused before any weight changes."""
    check_finite(update)
    for one in as_list(update):
        weight = lm.mlp_out_weight(one.layer)
        weight.add_(one.matrix().to(weight.device, weight.dtype))


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
def edited(lm: LoadedModel, updates: Sequence[Updates]) -> Iterator[LoadedModel]:
    """The model with `updates` applied to its weights; restored exactly afterwards."""
    flat = [one for update in updates for one in as_list(update)]
    with preserved_weights(lm, [u.layer for u in flat]):
        for update in flat:
            apply_update(lm, update)
        yield lm


class PerExampleEdits:
    """Forward hooks so row b of a batch sees its own updates, without touching the weights.

    `updates_per_row[b]` is None, one update, or a list of updates for row b; the hook adds
    ΔW x to the projection's output for those rows only (rank-one updates of all rows, low-rank
    ones of rank one included, in one einsum), and leaves the other rows bitwise unchanged. Use as a context manager around forward passes (or generate) whose batch
    has exactly len(updates_per_row) rows; `set_rows` swaps in the next batch's updates.
    """

    def __init__(
        self,
        lm: LoadedModel,
        updates_per_row: Sequence[Updates],
    ):
        self.lm = lm
        self.handles: list = []
        self.set_rows(updates_per_row)

    def set_rows(self, updates_per_row) -> None:
        self.n_rows = len(updates_per_row)
        by_layer: dict[int, tuple[list, list, list]] = {}
        self.others: dict[int, list[tuple[int, Update]]] = {}  # layer -> (row, update) not rank one
        for row, updates in enumerate(updates_per_row):
            for update in as_list(updates):
                layer = update.layer % self.lm.n_layers
                if isinstance(update, LowRankUpdate) and update.left.shape[1] == 1:
                    update = RankOneUpdate(update.layer, update.left[:, 0], update.right[0])
                if not isinstance(update, RankOneUpdate):
                    self.others.setdefault(layer, []).append((row, update))
                    continue
                entry = by_layer.setdefault(layer, ([], [], []))
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
            if layer in self.by_layer:
                rows, lefts, rights = self.by_layer[layer]
                coefficients = torch.einsum("rti,ri->rt", x[rows], rights.to(x.dtype))
                change = coefficients[..., None] * lefts.to(x.dtype)[:, None, :]
                output = output.index_add(0, rows, change.to(output.dtype))
            for row, update in self.others.get(layer, ()):
                output = output.index_add(
                    0,
                    torch.tensor([row], device=output.device),
                    update.change(x[row : row + 1]).to(output.dtype),
                )
            return output

        return add_updates

    def _register(self) -> None:
        for layer in {*self.by_layer, *self.others}:
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
