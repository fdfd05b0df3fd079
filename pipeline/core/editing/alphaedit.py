"""AlphaEdit (Fang et al. 2025): MEMIT's update projected onto the null space of preserved keys.

P projects onto the directions in which the keys of the statistics corpus hardly vary: from the
eigendecomposition of C = E[k kᵀ] (per layer), P = U₀ U₀ᵀ over the eigenvectors whose
eigenvalue is below `nullspace_threshold`. An update ΔW = Δ P leaves W k₀ unchanged for those
keys. For the current batch's keys K and the keys K_p of every batch edited before (sequential
editing, remembered through `commit`):

    ΔW = R Kᵀ P (P (K Kᵀ + K_p K_pᵀ) + α I)⁻¹      α = `l2` (the reference's 10)

held as `LowRankUpdate(left=R, right=Yᵀ)` with Y = (P (K Kᵀ + K_p K_pᵀ) + α I)⁻¹ P K. Before any
batch is committed (K_p = 0: independent and mass editing) Y = P K (α I + Kᵀ P K)⁻¹ (Woodbury),
an (n, n) solve instead of an (in, in) one. Targets, keys and the residual spread are MEMIT's
(`memit.py`).

As in the reference code (jianghoucheng/AlphaEdit): P is computed once, from the unedited model's
statistics, with an absolute threshold on the token-normalised moment's eigenvalues; K_p holds
each batch's keys read on the model after that batch's edit. Departure: the algebra runs in
float64 (the reference: float32), and the eigendecomposition uses `eigh` (C is symmetric; the
reference's SVD gives the same values).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from pipeline.core.editing.editor import JointEdit
from pipeline.core.editing.memit import Memit, MemitHparams, Moment
from pipeline.core.editing.ranges import VALUE_RANGES, Range, positive
from pipeline.core.editing.requests import PreparedRequest
from pipeline.core.editing.updates import LowRankUpdate
from pipeline.core.models import LoadedModel


@dataclass
class AlphaEditHparams(MemitHparams):
    """AlphaEdit's hyperparameters: MEMIT's with the null-space threshold and the ridge α."""

    nullspace_threshold: float = 2e-2
    l2: float = 10.0

    RANGES: ClassVar[dict[str, Range]] = {  # no λ: AlphaEdit's solve does not read it
        **VALUE_RANGES,
        "nullspace_threshold": positive(
            "P spans C's eigenvectors with eigenvalue below it, and C's eigenvalues are ≥ 0: "
            "at ≤ 0 P = 0 and every update is 0"
        ),
        "l2": positive("α in (P KKᵀ + αI)⁻¹, which is singular at 0 (every update NaN)"),
    }


def null_space_projection(moment: torch.Tensor, threshold: float) -> torch.Tensor:
    """P = U₀ U₀ᵀ over the eigenvectors of `moment` with eigenvalue below `threshold`."""
    values, vectors = torch.linalg.eigh(moment)
    null = vectors[:, values < threshold]
    return null @ null.T


class AlphaEdit(Memit):
    name = "alphaedit"

    def __init__(
        self,
        lm: LoadedModel,
        hparams: AlphaEditHparams,
        *,
        second_moments: Mapping[int, Moment],
        context_templates: Sequence[str] | None = None,
        batch_size: int = 64,
    ):
        super().__init__(
            lm,
            hparams,
            second_moments=second_moments,
            context_templates=context_templates,
            batch_size=batch_size,
        )
        missing = [layer for layer, m in self.moments.items() if m is None]
        if missing:
            raise ValueError(f"AlphaEdit needs the key statistics of layers {missing}")
        self.projections = {
            layer: null_space_projection(moment, hparams.nullspace_threshold)
            for layer, moment in self.moments.items()
        }
        self.preserved = {  # Σ K_p K_pᵀ over the batches committed so far
            layer: torch.zeros_like(moment) for layer, moment in self.moments.items()
        }
        self.committed = False

    def solve(self, layer: int, keys: torch.Tensor, residuals: torch.Tensor) -> LowRankUpdate:
        p = self.projections[layer]
        if not self.committed:  # Woodbury on αI: Yᵀ = (I + Kᵀ P K / α)⁻¹ (P K)ᵀ / α
            pk = p @ keys.T / self.hparams.l2  # (in, n)
            inner = keys @ pk
            inner = inner + torch.eye(len(inner), dtype=inner.dtype, device=inner.device)
            return LowRankUpdate(layer, residuals.T, torch.linalg.solve(inner, pk.T))
        m = p @ (keys.T @ keys + self.preserved[layer])
        m = m + self.hparams.l2 * torch.eye(len(m), dtype=m.dtype, device=m.device)
        y = torch.linalg.solve(m, p @ keys.T)  # (in, n)
        return LowRankUpdate(layer, residuals.T, y.T)

    def after_joint(self, lm: LoadedModel, prepared: Sequence[PreparedRequest]) -> dict:
        """The batch's keys on the edited model, to preserve once the edit is committed."""
        grams = {}
        for layer in self.layers:
            keys, _ = self.keys_and_states(lm, prepared, layer)
            grams[layer] = keys.T @ keys
        return {"key_grams": grams}

    def commit(self, lm: LoadedModel, edit: JointEdit) -> None:
        for layer, gram in edit.info.get("key_grams", {}).items():
            self.preserved[layer] += gram
            self.committed = True

    def state_dict(self) -> dict:
        return {
            "preserved": {k: v.clone() for k, v in self.preserved.items()},
            "committed": self.committed,
        }

    def load_state_dict(self, state: dict) -> None:
        self.preserved = {k: v.clone() for k, v in state["preserved"].items()}
        self.committed = state["committed"]
