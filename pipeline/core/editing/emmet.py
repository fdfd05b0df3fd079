"""EMMET (Gupta et al. 2024): batched ROME with equality constraints, in MEMIT's frame.

Each request's key must map exactly onto its target (K is in × n, R out × n, C = λ·E[kkᵀ]):

    minimise ‖ΔW‖_C  subject to  (W + ΔW) K = W K + R
    ΔW = R (Kᵀ C⁻¹ K + μ I)⁻¹ Kᵀ C⁻¹          μ = `emmet_lambda`, added only when n > 1

With one request and μ = 0 this is ROME's update with a consistent key (r-ROME):
ΔW = r (C⁻¹k)ᵀ / (kᵀ C⁻¹ k). Everything else (targets z, keys, the residual spread over the
layers) is MEMIT's (`memit.py`); only the solve differs.

As in the reference code (scalable-model-editing/unified-model-editing): the ridge μ I on
D = Kᵀ C⁻¹ K keeps large batches well conditioned (the paper has none), λ does not cancel once
μ > 0, and a D that cannot be factored falls back to the pseudo-inverse. C⁻¹K comes from a
Cholesky solve, never an explicit inverse.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from pipeline.core.editing.memit import Memit, MemitHparams
from pipeline.core.editing.ranges import Range, at_least, positive
from pipeline.core.editing.updates import LowRankUpdate


@dataclass
class EmmetHparams(MemitHparams):
    """EMMET's hyperparameters: MEMIT's, at one layer by default (the reference's GPT-2 XL)."""

    layers: tuple[int, ...] = (17,)
    mom2_update_weight: float = 1000.0  # λ (the reference's gpt2-xl; GPT-J uses 1)
    emmet_lambda: float = 0.1  # μ, the ridge on D for batches of more than one request

    RANGES: ClassVar[dict[str, Range]] = {
        **MemitHparams.RANGES,
        "mom2_update_weight": positive("C⁻¹ is (λC)⁻¹: λC is singular at 0"),
        "emmet_lambda": at_least(
            0, "μ is a ridge on D = Kᵀ C⁻¹ K; a negative one can make D singular"
        ),
    }


class Emmet(Memit):
    name = "emmet"

    def solve(self, layer: int, keys: torch.Tensor, residuals: torch.Tensor) -> LowRankUpdate:
        """ΔW = R D⁻¹ Kᵀ C⁻¹ with D = Kᵀ C⁻¹ K (+ μ I when n > 1), float64."""
        c_inv_keys = self.c_inverse(layer, keys)  # (in, n), λC factored once per layer
        if c_inv_keys is None:  # ill-conditioned λC: no better route than its own factor
            factor = torch.linalg.cholesky(self.hparams.mom2_update_weight * self.moments[layer])
            c_inv_keys = torch.cholesky_solve(keys.T, factor)
        d = keys @ c_inv_keys  # (n, n)
        if len(keys) > 1:
            d = d + self.hparams.emmet_lambda * torch.eye(len(d), dtype=d.dtype, device=d.device)
        try:
            right = torch.linalg.solve(d, c_inv_keys.T)  # D⁻¹ Kᵀ C⁻¹: (n, in)
        except torch.linalg.LinAlgError:
            right = torch.linalg.pinv(d) @ c_inv_keys.T
        return LowRankUpdate(layer, residuals.T, right)
