"""Keys and the second-moment solve: what an editor reads at the projection it rewrites.

A key k is the input of the MLP output projection at the subject's last token. Editors change
the projection in the metric of the keys' second moment C = E[k kᵀ] (`pipeline.core.second_moment`),
which needs C⁻¹ k: `KeySolver` factors λC + εI once (Cholesky, float64) and solves for many keys.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from pipeline.core.editing.updates import PerExampleEdits, Updates
from pipeline.core.hooks import StopForward, main_output, run_until_stopped
from pipeline.core.models import LoadedModel
from pipeline.core.second_moment import SecondMoment
from pipeline.core.tokens import right_pad

if TYPE_CHECKING:
    from pipeline.core.editing.prefixes import Frozen
    from pipeline.core.editing.requests import PreparedRequest
    from pipeline.core.editing.rows import Rows


@torch.no_grad()
def projection_inputs(
    lm: LoadedModel,
    layer: int,
    token_lists: Sequence[Sequence[int]],
    positions: Sequence[int],
    batch_size: int = 64,
) -> torch.Tensor:
    """Inputs of `mlp_out` at `layer` for sequence i at token positions[i]: (n, in)."""
    (keys,) = read_states(lm, token_lists, positions, [("mlp_out", layer, "input")], batch_size)
    return keys


class KeySolver:
    """Computes u = (λC + εI)⁻¹ k in float64 with one Cholesky factorisation.

    λ is `update_weight` (MEMIT's mom2_update_weight; it cancels in ROME), ε is `ridge` times the
    mean of diag(λC), which keeps the solve defined when C is singular. `moment=None` stands for
    C = I (no covariance adjustment).
    """

    def __init__(
        self,
        moment: torch.Tensor | SecondMoment | None,
        device: torch.device,
        *,
        update_weight: float = 1.0,
        ridge: float = 0.0,
    ):
        self.factor = None
        if moment is None:
            return
        if isinstance(moment, SecondMoment):
            moment = moment.moment()
        scaled = update_weight * moment.to(device, torch.float64)
        ridge = ridge * scaled.diagonal().mean()
        scaled = scaled + ridge * torch.eye(
            scaled.shape[0], dtype=scaled.dtype, device=scaled.device
        )
        self.factor = torch.linalg.cholesky(scaled)

    def solve(self, keys: torch.Tensor) -> torch.Tensor:
        """keys (n, in) -> (λC + εI)⁻¹ keys (n, in), float64."""
        keys = keys.double()
        return keys if self.factor is None else torch.cholesky_solve(keys.T, self.factor).T

    def __call__(self, keys: torch.Tensor) -> torch.Tensor:
        """keys (n, in) -> ROME's u = C⁻¹ k (n, in), float64, unit norm (the scale cancels)."""
        u = self.solve(keys)
        return u / u.norm(dim=-1, keepdim=True)


def request_keys(
    lm: LoadedModel,
    layer: int,
    prepared: Sequence[PreparedRequest],
    rows: Rows,
    frozen: Frozen | None,
) -> torch.Tensor:
    """Each request's keys: one per context template, then the bare prompt's: (B, T + 1, in).

    With `frozen` they are already known (the bare prompt is the "{}" template's row); without,
    and for a bare prompt that no template gives, they run on their own, as in the reference
    code."""
    if frozen is None:
        token_lists = [t for p in prepared for t in (*p.contexts, p.bare)]
        positions = [c for p in prepared for c in (*p.context_subject, p.bare_subject)]
        keys = projection_inputs(lm, layer, token_lists, positions)
        return keys.view(len(prepared), -1, keys.shape[-1])
    elsewhere = [r for r, p in enumerate(prepared) if p.bare not in p.contexts]
    bare_keys = iter(
        projection_inputs(
            lm,
            layer,
            [prepared[r].bare for r in elsewhere],
            [prepared[r].bare_subject for r in elsewhere],
        )
        if elsewhere
        else ()
    )
    keys = []
    for r, p in enumerate(prepared):
        contexts = frozen.keys[rows.context_rows[r]]
        bare = next(bare_keys) if r in elsewhere else contexts[p.contexts.index(p.bare)]
        keys.append(torch.cat([contexts, bare[None]]))
    return torch.stack(keys)


@torch.no_grad()
def read_states(
    lm: LoadedModel,
    token_lists: Sequence[Sequence[int]],
    positions: Sequence[int],
    reads: Sequence[tuple[str, int, str]],
    batch_size: int = 64,
    row_updates: Sequence[Updates] | None = None,
) -> list[torch.Tensor]:
    """Per read (module kind, layer, "input" or "output"): that module's input or output at token
    positions[i] of sequence i, (n, dim). One pass per batch, stopped once every read is had.
    With `row_updates`, sequence i runs under its own edit `row_updates[i]` (per-row hooks)."""
    pad_id = lm.tokenizer.pad_token_id or 0
    seen: dict[int, torch.Tensor] = {}
    out: list[list[torch.Tensor]] = [[] for _ in reads]

    def grab(index: int, input_side: bool):
        def hook(module, args, output=None):
            seen[index] = main_output(args[0] if input_side else output)
            if len(seen) == len(reads):
                raise StopForward

        return hook

    handles = []
    for index, (kind, layer, side) in enumerate(reads):
        module = lm.module(kind, layer)
        if side == "input":
            handles.append(module.register_forward_pre_hook(grab(index, True)))
        else:
            handles.append(module.register_forward_hook(grab(index, False)))
    try:
        for start in range(0, len(token_lists), batch_size):
            ids, mask = right_pad(token_lists[start : start + batch_size], pad_id, lm.device)
            seen.clear()
            edits = (
                PerExampleEdits(lm, row_updates[start : start + batch_size])
                if row_updates is not None
                else contextlib.nullcontext()
            )
            with edits:
                run_until_stopped(lm, ids, mask)
            rows = torch.arange(ids.shape[0], device=lm.device)
            cols = torch.as_tensor(positions[start : start + batch_size], device=lm.device)
            for index in range(len(reads)):
                out[index].append(seen[index][rows, cols])
    finally:
        for handle in handles:
            handle.remove()
    return [torch.cat(parts) for parts in out]
