"""ROME (Meng et al. 2022) and r-ROME (Gupta et al. 2024): rank-one edits of one MLP projection.

An edit rewrites a fact (subject, relation) -> new object by changing the MLP output projection
W (out, in) at one layer. The projection reads a key k (its input at the subject's last token)
and writes a value W k into the residual stream; ROME picks a value v* that makes the new object
likely, then makes the smallest change (in the metric of the keys' second moment C) that maps
the subject's key to v*:

    u  = C⁻¹ k̄                           k̄: the key averaged over context templates
    ΔW = (v* − W k_ref) uᵀ / (uᵀ k_ref)   so that (W + ΔW) k_ref = v*

Where ROME and r-ROME differ (`RomeHparams.consistent_keys`):
  - ROME (False, the reference implementation's behaviour) uses k̄ for u, but the key of the bare
    prompt (no context prefix) as k_ref, and v* = W k_bare + δ. When k_bare is atypical of the
    averaged key, uᵀ k_bare is small, ΔW blows up and the edit "disables" the model.
  - r-ROME (True) uses k̄ for u and as k_ref, so uᵀ k_ref cannot be small. As its authors' code
    (scalable-model-editing/rebuilding-rome), v* is still built on the bare prompt,
    v* = W k_bare + b + δ, so the update adds δ + W(k_bare − k̄) to W k̄ (`value_from="bare"`);
    `value_from="mean"` builds it on the averaged key, v* = W k̄ + b + δ, and adds exactly δ
    (r-ROME's equation; what this project's r-ROME did before). On SmolLM2 the two numerators
    differ by 5-16% of ‖δ‖.
In both, δ is the same optimised residual: it is added to the projection's output at the
subject's last token of every (context + prompt) during the v* optimisation, and the weight
decay and clamp are relative to ‖v₀‖, the output δ is added to.

An update is held as `RankOneUpdate(layer, left, right)` with ΔW = left ⊗ right (out, in):
`left` = (v* − W k_ref) / (uᵀ k_ref) lives in the output space, `right` = u in the key space.
(ROME's own code names them the other way round because GPT-2 stores W transposed.)
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from pipeline.core.editing import sequential
from pipeline.core.editing.editor import Editor, Indexed
from pipeline.core.editing.keys import KeySolver, request_keys
from pipeline.core.editing.prefixes import Frozen
from pipeline.core.editing.ranges import VALUE_RANGES, Range, at_least, check_ranges, positive
from pipeline.core.editing.requests import EditRequest, EditResult, PreparedRequest, prepare_all
from pipeline.core.editing.rows import Rows
from pipeline.core.editing.templates import templates_for
from pipeline.core.editing.updates import RankOneUpdate
from pipeline.core.editing.values import ValueOptions, optimise_values, optimised_dtype
from pipeline.core.models import LoadedModel, check_layers
from pipeline.core.second_moment import SecondMoment

log = logging.getLogger(__name__)


@dataclass
class RomeHparams:
    """ROME's hyperparameters; defaults are the paper's for GPT-2 XL (GPT-J uses layer 5).

    `context_templates` lists (length, count) pairs: the model writes `count` prefixes of
    `length` new tokens from the seed words, and "{}" (no prefix) comes first. As the ROME code,
    10 prefixes of 5 tokens and 10 of 10 (21 templates); the ROME code seeds them with the
    end-of-text token and counts it in the length (4 and 9 generated tokens), we seed with the
    MEMIT code's words and generate `length` tokens (`context_length_includes_seed` counts the
    seed as the code does).

    Choices where paper and reference code differ, each switchable (`conf/editor/
    rome-reference.yaml` sets the code's): the KL term reads the next-token distribution after
    the whole "{} is a" prompt (the paper's equation; the code, `kl_at_subject`: at the subject's
    last token); the early stop looks at the target's NLL (the code, `early_stop_on_total`: at
    the total loss); weight decay is v_weight_decay · ‖δ‖ / ‖v₀‖² as in the code. With those two
    switched, ours gave the reference code's keys and success flags and updates within ~5e-6 on
    SmolLM2 (same C and templates); as they are, ΔW differs from the code's by 6-34%.
    """

    layer: int = 17  # per-model presets (and why SmolLM2 uses 6) are in conf/editor/rome.yaml
    consistent_keys: bool = False  # False: ROME; True: r-ROME (see the module docstring)
    context_templates: tuple[tuple[int, int], ...] = ((5, 10), (10, 10))
    context_seeds: tuple[str, ...] = ("The", "Therefore", "Because", "I", "You")
    context_top_k: int = 5
    context_seed: int = 0
    v_num_grad_steps: int = 20  # forward passes; the last one only measures (at most 19 steps)
    v_lr: float = 5e-1
    v_loss_layer: int = -1  # the logits are read after this block (-1: the model's output)
    v_weight_decay: float = 0.5
    clamp_norm_factor: float = 4.0  # ‖δ‖ ≤ factor · ‖original value‖
    kl_factor: float = 0.0625
    kl_prompts: tuple[str, ...] = ("{} is a",)
    early_stop_nll: float = 5e-2  # stop optimising a request once its target NLL is below this
    early_stop_on_total: bool = False  # True: the total loss instead (the reference code)
    kl_at_subject: bool = False  # True: KL at the subject's last token (the reference code)
    context_length_includes_seed: bool = False  # True: the seed counts in a prefix's length
    value_from: str = "bare"  # v₀ that δ is added to: the bare prompt's output (both authors'
    # codes) or "mean", W k̄ + b (r-ROME's paper; with consistent keys the update adds exactly δ)
    mom2_update_weight: float = 15000.0  # λ in (λC)⁻¹; cancels in ROME, kept for parity
    mom2_ridge: float = 1e-6  # ridge relative to mean(diag(λC)), keeps the solve defined
    reject_already_predicted: bool = True  # a target the model already gives is no edit
    # How, not what (the same v* up to float rounding): False runs the tokens before each row's
    # subject once, reusing their keys and values at every v* step, and batches rows of equal
    # length together; True runs every row whole, in one padded batch, at every step, as the
    # reference code does (benchmarks compare the two).
    v_whole_rows: bool = False

    RANGES: ClassVar[dict[str, Range]] = {
        **VALUE_RANGES,
        "mom2_update_weight": positive(
            "λC is factored (Cholesky) for u = (λC)⁻¹k̄, so it must be positive definite; "
            "λ cancels in ΔW, not in the factor"
        ),
        "mom2_ridge": at_least(
            0, "a ridge on λC's diagonal; a negative one can make it indefinite"
        ),
    }

    def __post_init__(self):
        """Lists from a YAML config become tuples, so equal settings compare equal; settings
        outside `RANGES` are refused."""
        self.context_templates = tuple(
            tuple(int(x) for x in pair) for pair in self.context_templates
        )
        self.context_seeds = tuple(self.context_seeds)
        self.kl_prompts = tuple(self.kl_prompts)
        if self.value_from not in ("bare", "mean"):
            raise ValueError(f"value_from must be bare or mean, got {self.value_from!r}")
        check_ranges(self, self.RANGES)

    def value_options(self) -> ValueOptions:
        return ValueOptions.of(self, self.layer, "mlp_out")  # δ at the MLP output

    @classmethod
    def for_editor(cls, name: str, **overrides) -> RomeHparams:
        """`rome` (original keys) or `r-rome` (consistent keys), with overrides."""
        variants = {"rome": False, "r-rome": True}
        if name not in variants:
            raise ValueError(f"editor must be one of {sorted(variants)}, got {name!r}")
        return cls(consistent_keys=variants[name], **overrides)


def _compute_batch(
    lm: LoadedModel,
    indexed_requests: Sequence[tuple[int, EditRequest]],
    hp: RomeHparams,
    solver: KeySolver,
    templates: Sequence[str],
) -> list[EditResult]:
    """The updates of one batch of requests, in shared forward passes (see the module's algebra).

    Keys and v* come from one set of rows (`Rows`): every request's prompt in every context
    template, and its KL prompts; the keys are read in the pass that `Frozen` makes once."""
    prepared, results = prepare_all(
        lm, indexed_requests, templates, hp.kl_prompts, hp.reject_already_predicted
    )
    if prepared:
        results.update(_rank_one_updates(lm, prepared, hp, solver, len(templates)))
    return [results[index] for index, _ in indexed_requests]


def _rank_one_updates(
    lm: LoadedModel,
    prepared: Sequence[PreparedRequest],
    hp: RomeHparams,
    solver: KeySolver,
    n_templates: int,
) -> dict[int, EditResult]:
    options = hp.value_options()
    rows = Rows.build(prepared, hp.v_whole_rows, hp.kl_at_subject)
    frozen = None if hp.v_whole_rows else Frozen.compute(lm, rows, hp.layer % lm.n_layers)
    keys = request_keys(lm, hp.layer, prepared, rows, frozen).double()  # (B, templates + 1, in)
    mean_keys = keys[:, :n_templates].mean(dim=1)  # k̄
    bare_keys = keys[:, n_templates]
    ref_keys = mean_keys if hp.consistent_keys else bare_keys
    value_keys = bare_keys if hp.value_from == "bare" else mean_keys

    projection = lm.module("mlp_out", hp.layer)
    weight = lm.mlp_out_weight(hp.layer).detach().double()
    linear = ref_keys @ weight.T  # W k_ref
    base = value_keys @ weight.T  # W k₀: v* = W k₀ + δ (+ b)
    bias = getattr(projection, "bias", None)
    reference_outputs = base if bias is None else base + bias.detach().double()

    deltas, nlls, steps = optimise_values(lm, rows, frozen, reference_outputs, options)
    values = base + deltas.double()  # v* (its linear part)
    u = solver(mean_keys)
    alignment = (u * ref_keys).sum(-1, keepdim=True)  # uᵀk_ref: small means a huge ΔW
    lefts = (values - linear) / alignment
    dtype = optimised_dtype(lm)  # of the key and value reported: float32 or wider
    results = {}
    for row, p in enumerate(prepared):
        update = RankOneUpdate(hp.layer % lm.n_layers, lefts[row].to(lm.dtype), u[row].to(lm.dtype))
        results[p.index] = EditResult(
            p.index,
            p.request,
            update=update,
            key=ref_keys[row].to(dtype),
            value=values[row].to(dtype),
            target_nll=nlls[row],
            steps=steps[row],
            info={
                "delta_norm": float(deltas[row].norm()),
                "update_norm": float(lefts[row].norm()),  # ‖ΔW‖ (u has unit norm)
                "alignment": float(alignment[row] / ref_keys[row].norm()),
                "templates": n_templates,
            },
        )
    return results


def _setup(lm, hparams, second_moment, context_templates) -> tuple[list[str], KeySolver]:
    check_layers(lm.n_layers, layer=hparams.layer, v_loss_layer=hparams.v_loss_layer)
    layer, loss_layer = lm.path("mlp_out", hparams.layer), hparams.v_loss_layer % lm.n_layers
    if loss_layer < hparams.layer % lm.n_layers:
        raise ValueError(
            f"v_loss_layer {hparams.v_loss_layer} reads the model below the edited layer "
            f"({layer}), where δ cannot change the loss"
        )
    templates = list(context_templates) if context_templates else templates_for(lm, hparams)
    solver = KeySolver(
        second_moment,
        lm.device,
        update_weight=hparams.mom2_update_weight,
        ridge=hparams.mom2_ridge,
    )
    return templates, solver


class Rome(Editor):
    """ROME (or r-ROME, `consistent_keys`) bound to its statistics and context templates."""

    def __init__(
        self,
        lm: LoadedModel,
        hparams: RomeHparams,
        *,
        second_moment: torch.Tensor | SecondMoment | None,
        context_templates: Sequence[str] | None = None,
        batch_size: int = 8,
    ):
        self.name = "r-rome" if hparams.consistent_keys else "rome"
        self.hparams, self.batch_size = hparams, batch_size
        self.layers = (hparams.layer % lm.n_layers,)
        self.templates, self.solver = _setup(lm, hparams, second_moment, context_templates)

    def independent(self, lm: LoadedModel, requests: Indexed) -> list[EditResult]:
        results = []
        for start in range(0, len(requests), self.batch_size):
            batch = requests[start : start + self.batch_size]
            results += _compute_batch(lm, batch, self.hparams, self.solver, self.templates)
        return results


def compute_updates(
    lm: LoadedModel,
    requests: Sequence[EditRequest],
    hparams: RomeHparams,
    *,
    second_moment: torch.Tensor | SecondMoment | None,
    context_templates: Sequence[str] | None = None,
    batch_size: int = 8,
    first_index: int = 0,
) -> list[EditResult]:
    """One independent update per request, computed on the model as it is (not applied).

    Requests are processed `batch_size` at a time in shared forward passes; the results equal
    one-at-a-time computation up to float rounding. A bad request yields an `EditResult` whose
    `error` says why; the others go on. `second_moment` is C = E[k kᵀ] at `hparams.layer`
    (None: identity, i.e. no covariance adjustment). Request i is numbered first_index + i.
    """
    editor = Rome(
        lm,
        hparams,
        second_moment=second_moment,
        context_templates=context_templates,
        batch_size=batch_size,
    )
    return editor.independent(lm, [(first_index + i, r) for i, r in enumerate(requests)])


def compute_update(
    lm: LoadedModel,
    request: EditRequest,
    hparams: RomeHparams,
    *,
    second_moment: torch.Tensor | SecondMoment | None,
    context_templates: Sequence[str] | None = None,
) -> EditResult:
    """One request; raises its `EditRequestError` instead of returning it."""
    (result,) = compute_updates(
        lm, [request], hparams, second_moment=second_moment, context_templates=context_templates
    )
    if result.error is not None:
        raise result.error
    return result


def edit_sequentially(
    lm: LoadedModel,
    requests: Sequence[EditRequest],
    hparams: RomeHparams,
    *,
    second_moment: torch.Tensor | SecondMoment | None,
    context_templates: Sequence[str] | None = None,
    checkpoint_every: int = 0,
    on_checkpoint: Callable[[int, list[EditResult]], None] | None = None,
) -> list[EditResult]:
    """ROME's edits one after another, each computed on the already-edited model (in place);
    see `sequential.edit_sequentially`."""
    editor = Rome(lm, hparams, second_moment=second_moment, context_templates=context_templates)
    return sequential.edit_sequentially(
        lm, requests, editor, checkpoint_every=checkpoint_every, on_checkpoint=on_checkpoint
    )
