"""MEMIT (Meng et al. 2023): many facts written at once, spread over a range of MLP layers.

For requests i = 1..n, with L the last layer of the range:
  1. a target hidden state z_i = h_i + δ_i at layer L, where h_i is block L's output at the
     subject's last token of the bare prompt, and δ_i is optimised as ROME's v* is
     (`values.optimise_values`, δ added to block L's output, ‖δ‖ ≤ 0.75‖h_i‖), batched across
     requests;
  2. for each layer l_j of the range, lowest first, on the model as the layers before left it:
         K = the requests' keys at l_j (in, n)      H = block L's outputs now (d, n)
         R = (Z − H) / (number of layers left, l_j included)
         ΔW = R Kᵀ (λC + K Kᵀ)⁻¹                   (float64, one linear solve)
     ΔW is applied before the next layer's keys are read.
The update of a layer is held as `LowRankUpdate(left=R, right=Aᵀ)` with A = (λC + K Kᵀ)⁻¹ K;
an edit is the list over the range. `solve` is the only step EMMET and AlphaEdit replace.

A is computed without factoring an (in, in) matrix per edit: λC is factored once per layer
(Cholesky) and A = U (I + Kᵀ U)⁻¹ with U = (λC)⁻¹ K (Woodbury), an (n, n) solve. Where λC is
too ill-conditioned for that (condition estimate above 1e10, or no factor: a C from a few
prompts), the direct solve of (λC + K Kᵀ) A = K runs instead, as in the reference code.
In independent mode every request's spread runs in the same forward passes: each row carries
its own request's updates of the layers below as a per-row hook (`PerExampleEdits`), where the
reference code writes each request into the weights and reads again.

Choices where the reference code (kmeng01/memit) is more specific than the paper, kept here:
keys averaged in two groups, ½ the bare prompt's and ½ the mean over the prefixes
(`key_average="groups"`; "templates" for a plain mean); λ = `mom2_update_weight` times the
token-normalised second moment. Departures, as for ROME, each switchable to the code's: the KL
term is read after the whole "{} is a" prompt (`kl_at_subject`: at the subject's last token),
the early stop tests the target NLL (`early_stop_on_total`: the total loss), and a context
template of length 10 has 10 generated tokens (`context_length_includes_seed`: 9).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from tqdm.auto import tqdm

from pipeline.core.editing.editor import Editor, Indexed, JointEdit
from pipeline.core.editing.keys import KeySolver, read_states
from pipeline.core.editing.prefixes import Frozen
from pipeline.core.editing.ranges import VALUE_RANGES, Range, check_ranges, positive
from pipeline.core.editing.requests import EditResult, PreparedRequest, prepare_all
from pipeline.core.editing.rows import Rows
from pipeline.core.editing.templates import templates_for
from pipeline.core.editing.updates import LowRankUpdate, apply_update, preserved_weights
from pipeline.core.editing.values import (
    ValueOptions,
    ValueStore,
    edited_weights_digest,
    optimise_values,
    optimised_dtype,
    value_key,
)
from pipeline.core.models import LoadedModel, check_layers
from pipeline.core.second_moment import SecondMoment

Moment = torch.Tensor | SecondMoment | None


@dataclass
class MemitHparams:
    """MEMIT's hyperparameters; defaults are the reference code's for GPT-2 XL."""

    layers: tuple[int, ...] = (13, 14, 15, 16, 17)  # presets per model: conf/editor/memit.yaml
    context_templates: tuple[tuple[int, int], ...] = ((10, 5),)  # (length, count): 5 of 10
    context_seeds: tuple[str, ...] = ("The", "Therefore", "Because", "I", "You")
    context_top_k: int = 5
    context_seed: int = 0
    key_average: str = "groups"  # groups: ½ bare + ½ mean of prefixes (reference); templates
    v_num_grad_steps: int = 20
    v_lr: float = 5e-1
    v_loss_layer: int = -1
    v_weight_decay: float = 0.5
    clamp_norm_factor: float = 0.75
    kl_factor: float = 0.0625
    kl_prompts: tuple[str, ...] = ("{} is a",)
    early_stop_nll: float = 5e-2
    mom2_update_weight: float = 20000.0  # λ; the reference uses 15000 for GPT-J
    reject_already_predicted: bool = True
    v_whole_rows: bool = False  # True: whole rows at every z step (the reference protocol)
    early_stop_on_total: bool = False  # True: stop on the total loss (the reference code)
    kl_at_subject: bool = False  # True: KL at the subject's last token (the reference code)
    context_length_includes_seed: bool = False  # True: the seed counts in the length (code)

    RANGES: ClassVar[dict[str, Range]] = {
        **VALUE_RANGES,
        "mom2_update_weight": positive(
            "it weights C in (λC + KKᵀ)⁻¹, which is singular at 0 (KKᵀ has rank n, below the "
            "key dimension): update norms reached 3e18"
        ),
    }

    def __post_init__(self):
        self.layers = tuple(int(x) for x in self.layers)
        self.context_templates = tuple(
            tuple(int(x) for x in pair) for pair in self.context_templates
        )
        self.context_seeds = tuple(self.context_seeds)
        self.kl_prompts = tuple(self.kl_prompts)
        if self.key_average not in ("groups", "templates"):
            raise ValueError(f"key_average must be groups or templates, got {self.key_average!r}")
        if not self.layers:
            raise ValueError("layers must name at least one layer")
        check_ranges(self, self.RANGES)

    def value_options(self, z_layer: int) -> ValueOptions:
        return ValueOptions.of(self, z_layer, "block")  # δ at the block output (residual)


def moment_matrix(moment: Moment, device: torch.device) -> torch.Tensor | None:
    """C as a float64 matrix on `device` (None stays None: the identity)."""
    if moment is None:
        return None
    if isinstance(moment, SecondMoment):
        moment = moment.moment()
    return moment.to(device, torch.float64)


def well_conditioned_solver(moment: torch.Tensor | None, weight: float) -> KeySolver | None:
    """A Cholesky solver for λC, or None where C is absent, not positive definite, or its
    condition estimate (the factor's diagonal range, squared) is above 1e10."""
    if moment is None:
        return None
    try:
        solver = KeySolver(moment, moment.device, update_weight=weight)
    except torch.linalg.LinAlgError:
        return None
    diagonal = solver.factor.diagonal().abs()
    if float(diagonal.max() / diagonal.min()) ** 2 > 1e10:
        return None
    return solver


class Memit(Editor):
    """MEMIT bound to C at each layer of its range and to its context templates."""

    name = "memit"
    joint_solve = True
    value_store: ValueStore | None = None  # z kept between runs and editors (`values.py`)

    def __init__(
        self,
        lm: LoadedModel,
        hparams: MemitHparams,
        *,
        second_moments: Mapping[int, Moment],
        context_templates: Sequence[str] | None = None,
        batch_size: int = 64,
    ):
        self.hparams = hparams
        self.batch_size = batch_size  # requests whose z share forward passes (memory bound)
        check_layers(lm.n_layers, layers=hparams.layers, v_loss_layer=hparams.v_loss_layer)
        self.layers = tuple(sorted({layer % lm.n_layers for layer in hparams.layers}))
        self.z_layer = self.layers[-1]
        if hparams.v_loss_layer % lm.n_layers < self.z_layer:
            raise ValueError(
                f"v_loss_layer {hparams.v_loss_layer} reads the model below the last edited "
                f"layer ({self.z_layer}), where δ cannot change the loss"
            )
        self.templates = (
            list(context_templates) if context_templates else templates_for(lm, hparams)
        )
        if self.templates[0] != "{}":
            raise ValueError('the first context template must be the bare prompt "{}"')
        moments = {layer % lm.n_layers: m for layer, m in second_moments.items()}
        self.moments = {
            layer: moment_matrix(moments.get(layer), lm.device) for layer in self.layers
        }
        self._solvers: dict[int, KeySolver | None] = {}

    def c_inverse(self, layer: int, keys: torch.Tensor) -> torch.Tensor | None:
        """(λC)⁻¹ Kᵀ (in, n) for keys (n, in), from λC factored once per layer; None where λC
        cannot be factored or its condition estimate exceeds 1e10 (too close to singular)."""
        if layer not in self._solvers:
            self._solvers[layer] = well_conditioned_solver(
                self.moments[layer], self.hparams.mom2_update_weight
            )
        solver = self._solvers[layer]
        if self.moments[layer] is None:
            return keys.T / self.hparams.mom2_update_weight
        return None if solver is None else solver.solve(keys).T

    # The step the successors replace --------------------------------------------------------

    def solve(self, layer: int, keys: torch.Tensor, residuals: torch.Tensor) -> LowRankUpdate:
        """ΔW = R Kᵀ (λC + K Kᵀ)⁻¹ for keys (n, in) and residuals (n, out), float64."""
        u = self.c_inverse(layer, keys)  # (in, n)
        if u is not None:  # Woodbury: Aᵀ = (I + Kᵀ U)⁻¹ Uᵀ, (I + Kᵀ U) symmetric
            inner = keys @ u
            inner = inner + torch.eye(len(inner), dtype=inner.dtype, device=inner.device)
            return LowRankUpdate(layer, residuals.T, torch.linalg.solve(inner, u.T))
        gram = keys.T @ keys
        moment = self.moments[layer]
        if moment is not None:
            gram = gram + self.hparams.mom2_update_weight * moment
        else:
            gram = gram + self.hparams.mom2_update_weight * torch.eye(
                len(gram), dtype=gram.dtype, device=gram.device
            )
        a = torch.linalg.solve(gram, keys.T)  # (in, n)
        return LowRankUpdate(layer, residuals.T, a.T)

    # The algorithm ----------------------------------------------------------------------------

    def _prepare(self, lm, requests: Indexed):
        hp = self.hparams
        return prepare_all(lm, requests, self.templates, hp.kl_prompts, hp.reject_already_predicted)

    def targets(
        self, lm: LoadedModel, prepared: Sequence[PreparedRequest]
    ) -> tuple[torch.Tensor, list[float], list[int], torch.Tensor, list[bool]]:
        """z = h + δ for every request, (n, d) float64, with the NLLs, steps and δ; with a
        `value_store`, the δ found there are reused (the last list says which) and only the
        others optimised."""
        hp = self.hparams
        (h,) = read_states(
            lm,
            [p.bare for p in prepared],
            [p.bare_subject for p in prepared],
            [("block", self.z_layer, "output")],
        )
        options = hp.value_options(self.z_layer)
        store, keys, found = self.value_store, [], [None] * len(prepared)
        if store is not None:
            weights = edited_weights_digest(lm)
            keys = [value_key(lm, p, options, weights) for p in prepared]
            found = [store.get(key) for key in keys]
        missing = [i for i, row in enumerate(found) if row is None]
        reused = [row is not None for row in found]
        chunks = range(0, len(missing), self.batch_size)
        for start in tqdm(chunks, desc=f"z of {len(missing)} requests", disable=len(chunks) < 2):
            chunk = missing[start : start + self.batch_size]
            subset = [prepared[i] for i in chunk]
            rows = Rows.build(subset, hp.v_whole_rows, hp.kl_at_subject)
            frozen = None if hp.v_whole_rows else Frozen.compute(lm, rows, self.z_layer)
            deltas, nlls, steps = optimise_values(lm, rows, frozen, h[chunk], options)
            fresh = {
                i: {"delta": delta.tolist(), "nll": nll, "steps": step}
                for i, delta, nll, step in zip(chunk, deltas, nlls, steps, strict=True)
            }
            if store is not None:
                store.put({keys[i]: row for i, row in fresh.items()})
            for i, row in fresh.items():
                found[i] = row
        deltas = torch.tensor(
            [row["delta"] for row in found], device=lm.device, dtype=optimised_dtype(lm)
        )
        nlls = [float(row["nll"]) for row in found]
        steps = [int(row["steps"]) for row in found]
        return h.double() + deltas.double(), nlls, steps, deltas, reused

    def keys_and_states(
        self,
        lm: LoadedModel,
        prepared: Sequence[PreparedRequest],
        layer: int,
        own_updates: Sequence[Sequence[LowRankUpdate]] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each request's key at `layer` (n, in) and block z_layer's output at its bare prompt
        (n, d), float64, from one pass over every (template, prompt) row; with `own_updates`,
        request i's rows run under its own updates `own_updates[i]` only."""
        n_templates = len(self.templates)
        tokens = [t for p in prepared for t in p.contexts]
        positions = [c for p in prepared for c in p.context_subject]
        row_updates = (
            None
            if own_updates is None
            else [list(updates) for updates in own_updates for _ in range(n_templates)]
        )
        keys, states = read_states(
            lm,
            tokens,
            positions,
            [("mlp_out", layer, "input"), ("block", self.z_layer, "output")],
            row_updates=row_updates,
        )
        keys = keys.double().view(len(prepared), n_templates, -1)
        states = states.double().view(len(prepared), n_templates, -1)[:, 0]  # "{}": bare
        if self.hparams.key_average == "groups" and n_templates > 1:
            keys = 0.5 * keys[:, 0] + 0.5 * keys[:, 1:].mean(dim=1)
        else:
            keys = keys.mean(dim=1)
        return keys, states

    def spread(
        self, lm: LoadedModel, prepared: Sequence[PreparedRequest], z: torch.Tensor
    ) -> list[LowRankUpdate]:
        """The layer loop, editing the model in place (callers restore it)."""
        updates = []
        for j, layer in enumerate(self.layers):
            keys, states = self.keys_and_states(lm, prepared, layer)
            residuals = (z - states) / (len(self.layers) - j)
            update = self.solve(layer, keys, residuals)
            update = LowRankUpdate(layer, update.left.to(lm.dtype), update.right.to(lm.dtype))
            apply_update(lm, update)
            updates.append(update)
        return updates

    def spread_each(
        self, lm: LoadedModel, prepared: Sequence[PreparedRequest], z: torch.Tensor
    ) -> list[list[LowRankUpdate]]:
        """`spread` of each request alone, all requests in shared passes: request i's rows see
        its own updates of the layers below through per-row hooks; the weights are untouched."""
        own: list[list[LowRankUpdate]] = [[] for _ in prepared]
        for j, layer in enumerate(self.layers):
            keys, states = self.keys_and_states(lm, prepared, layer, own)
            residuals = (z - states) / (len(self.layers) - j)
            for i, updates in enumerate(own):
                update = self.solve(layer, keys[i : i + 1], residuals[i : i + 1])
                updates.append(
                    LowRankUpdate(layer, update.left.to(lm.dtype), update.right.to(lm.dtype))
                )
        return own

    def _result(self, p, nll, steps, delta, reused, updates=None) -> EditResult:
        info = {
            "delta_norm": float(delta.norm()),
            "templates": len(self.templates),
            "z_reused": reused,  # from the value store, not optimised in this call
        }
        return EditResult(
            p.index, p.request, update=updates, target_nll=nll, steps=steps, info=info
        )

    def independent(self, lm: LoadedModel, requests: Indexed) -> list[EditResult]:
        """Each request alone; z and the spread run for all of them in shared batches."""
        prepared, results = self._prepare(lm, requests)
        if prepared:
            z, nlls, steps, deltas, reused = self.targets(lm, prepared)
            spreads = self.spread_each(lm, prepared, z)
            for i, (p, updates) in enumerate(zip(prepared, spreads, strict=True)):
                results[p.index] = self._result(p, nlls[i], steps[i], deltas[i], reused[i], updates)
        return [results[index] for index, _ in requests]

    def joint(self, lm: LoadedModel, requests: Indexed) -> JointEdit:
        """Every request in one update per layer."""
        prepared, results = self._prepare(lm, requests)
        updates: list[LowRankUpdate] = []
        info: dict = {}
        if prepared:
            started = time.perf_counter()
            z, nlls, steps, deltas, reused = self.targets(lm, prepared)
            z_done = time.perf_counter()
            with preserved_weights(lm, self.layers):
                updates = self.spread(lm, prepared, z)
                info = self.after_joint(lm, prepared)
            # Where a large joint edit's time goes (mass mode reports it per size).
            info["seconds"] = {
                "z": round(z_done - started, 2),
                "spread": round(time.perf_counter() - z_done, 2),
            }
            for i, p in enumerate(prepared):
                results[p.index] = self._result(p, nlls[i], steps[i], deltas[i], reused[i])
        return JointEdit(updates, [results[index] for index, _ in requests], info)

    def after_joint(self, lm: LoadedModel, prepared: Sequence[PreparedRequest]) -> dict:
        """What a subclass reads off the model as a joint edit left it (before it is undone)."""
        return {}
