"""The target-value optimisation (ROME's v*, MEMIT's z): one residual δ per request.

δ is added to one module's output (`ValueOptions.site` at `layer`: the MLP output projection for
ROME, the block output for MEMIT) at the subject's last token of every (context + prompt) row, and
optimised with Adam so the rows predict the new target, while a KL term on the "{} is a" prompts
keeps what the subject is:

    loss(δ) = mean NLL(target) + kl_factor · KL(P_δ ‖ P_0) + weight_decay · ‖δ‖ / ‖v₀‖²
    ‖δ‖ ≤ clamp_norm_factor · ‖v₀‖   (v₀: the module's original output for the reference key)

Requests in a batch are independent (own δ, own Adam state, own early stop); only what δ changes
is computed at each step (`pipeline.core.editing.prefixes`). δ and the loss are float32, or
float64 for a float64 model (`optimised_dtype`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from pipeline.core.editing.prefixes import Frozen, replaying, suffix_inputs
from pipeline.core.editing.requests import PreparedRequest
from pipeline.core.editing.rows import Rows
from pipeline.core.hooks import main_output, output_of
from pipeline.core.models import LoadedModel, identity_of


@dataclass(frozen=True)
class ValueOptions:
    """Where δ enters and how it is optimised (ROME's v_* hyperparameters, MEMIT's alike)."""

    layer: int  # δ is added to the output of `site` at this layer
    site: str = "mlp_out"  # a module kind of the family registry: mlp_out (ROME) or block (MEMIT)
    loss_layer: int = -1  # the logits are read after this block (-1: the model's output)
    steps: int = 20  # forward passes; the last one only measures (at most steps - 1 updates)
    lr: float = 5e-1
    weight_decay: float = 0.5
    clamp_norm_factor: float = 4.0  # ‖δ‖ ≤ factor · ‖original output‖
    kl_factor: float = 0.0625
    early_stop_nll: float = 5e-2  # a request stops once its target NLL is below this
    whole_rows: bool = False  # True: every row whole at every step (the reference protocol)
    # The reference code's choices where the paper differs (both False: the paper's):
    early_stop_on_total: bool = False  # stop on the total loss < early_stop_nll, not the NLL
    kl_at_subject: bool = False  # read the KL prompts at the subject's last token, not the end

    @classmethod
    def of(cls, hparams, layer: int, site: str) -> ValueOptions:
        """From an editor's hyperparameters, which name these settings as ROME's code does
        (v_num_grad_steps, v_lr, v_loss_layer, v_weight_decay, clamp_norm_factor, ...)."""
        return cls(
            layer=layer,
            site=site,
            loss_layer=hparams.v_loss_layer,
            steps=hparams.v_num_grad_steps,
            lr=hparams.v_lr,
            weight_decay=hparams.v_weight_decay,
            clamp_norm_factor=hparams.clamp_norm_factor,
            kl_factor=hparams.kl_factor,
            early_stop_nll=hparams.early_stop_nll,
            whole_rows=hparams.v_whole_rows,
            early_stop_on_total=hparams.early_stop_on_total,
            kl_at_subject=hparams.kl_at_subject,
        )


def _adder(rows: torch.Tensor, cols: torch.Tensor, deltas: torch.Tensor):
    """A forward hook adding deltas[i] to the output at (rows[i], cols[i])."""

    def add_delta(module, args, output):
        hidden = main_output(output)
        changed = hidden.index_put((rows, cols), deltas.to(hidden.dtype), accumulate=True)
        return (changed, *output[1:]) if isinstance(output, tuple) else changed

    return add_delta


def _run_rows(
    lm: LoadedModel,
    opts: ValueOptions,
    rows: Rows,
    frozen: Frozen | None,
    members: list[int],
    deltas: torch.Tensor,
) -> torch.Tensor:
    """Block outputs at `opts.loss_layer` for the given rows' tokens after their split, with
    deltas[i] added to the projection's output at row members[i]'s subject: (rows, width, d)."""
    device = lm.device
    ids, mask, inputs = suffix_inputs(lm, rows, frozen and frozen.prefixes, members)
    columns = torch.as_tensor([rows.subject[r] - rows.split[r] for r in members], device=device)
    replay = contextlib.nullcontext()
    if frozen is not None and frozen.block_inputs is not None:
        state = frozen.block_inputs[torch.as_tensor(members, device=device), : ids.shape[1]]
        below = [lm.module("block", i) for i in range(frozen.layer)]
        replay = replaying(below, frozen.block_output(state))
    handle = lm.module(opts.site, opts.layer).register_forward_hook(
        _adder(torch.arange(len(members), device=device), columns, deltas)
    )
    try:
        with torch.enable_grad(), replay:
            return output_of(lm, lm.module("block", opts.loss_layer), ids, mask, **inputs)
    finally:
        handle.remove()


def optimised_dtype(lm: LoadedModel) -> torch.dtype:
    """Where δ, the logits and the losses are computed: float32, or wider for a wider model (a
    float64 model is optimised in float64, as the tests' exact comparisons need; a bf16/fp16
    model's logits are read in float32)."""
    return torch.promote_types(lm.dtype, torch.float32)


def optimise_values(
    lm: LoadedModel,
    rows: Rows,
    frozen: Frozen | None,
    reference_outputs: torch.Tensor,
    opts: ValueOptions,
) -> tuple[torch.Tensor, list[float], list[int]]:
    """Optimise one residual δ per request (rows of a (B, out) tensor), all in one batch.

    Each request contributes its (context + prompt + target[:-1]) rows, teacher-forced on the
    target, and its KL rows; every row adds its own request's δ to the projection's output at
    the subject's last token. Requests are independent: their losses are summed, each has its own
    Adam state, and a request leaves the batch as soon as its target NLL is low enough. With
    `frozen` (see `Frozen`), only what δ changes runs at each step; without, whole rows.
    """
    n_req = len(rows.context_rows)
    device = lm.device
    dtype = optimised_dtype(lm)
    reference_outputs = reference_outputs.to(dtype)
    dim = reference_outputs.shape[1]
    deltas = [
        torch.zeros(dim, device=device, dtype=dtype, requires_grad=True) for _ in range(n_req)
    ]
    optimisers = [torch.optim.Adam([d], lr=opts.lr) for d in deltas]
    max_norms = opts.clamp_norm_factor * reference_outputs.norm(dim=-1)
    ref_sq = reference_outputs.norm(dim=-1) ** 2
    nll_reads = torch.as_tensor(rows.nll_reads, device=device).view(-1, 3)
    nll_tokens = torch.as_tensor(rows.nll_tokens, device=device)
    kl_reads = torch.as_tensor(rows.kl_reads, device=device).view(-1, 3)
    kl_init = None  # the KL prompts' original distributions (δ = 0), one per KL read
    nlls = [float("nan")] * n_req
    steps = [0] * n_req
    active = list(range(n_req))

    for iteration in range(opts.steps):
        slot, nll_mask, kl_mask, reads = _active_reads(active, n_req, nll_reads, kl_reads)
        active_deltas = torch.stack([deltas[r] for r in active])
        states = _read_states(lm, opts, rows, frozen, active, slot, active_deltas, reads)
        logits = lm.logits(states).to(dtype)
        norms = torch.stack([deltas[r].norm() for r in active])
        nll, totals, kl_log_probs = _losses(
            opts,
            logits,
            slot[reads[:, 2]],
            nll_tokens[nll_mask],
            None if kl_init is None else kl_init[kl_mask],
            norms,
            ref_sq[active],
        )
        if kl_init is None:  # iteration 0: δ is still zero, the original distributions
            kl_init = kl_log_probs.detach()

        for s, r in enumerate(active):
            nlls[r] = float(nll[s].detach())
        if iteration == opts.steps - 1:  # the last pass only measures
            break
        moving = _moving_on(opts, active, nll, totals)
        totals.sum().backward()  # requests are independent
        _step(optimisers, deltas, max_norms, moving)
        for r in moving:
            steps[r] += 1
        active = moving
        if not active:
            break
    return torch.stack([d.detach() for d in deltas]), nlls, steps


def _active_reads(
    active: list[int], n_req: int, nll_reads: torch.Tensor, kl_reads: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The reads (row, column, owner) of a pass over the requests still optimising: each
    request's slot among them (-1: stopped), which NLL reads and which KL reads are theirs, and
    those reads, the NLL reads first."""
    slot = torch.full((n_req,), -1, device=nll_reads.device)
    slot[active] = torch.arange(len(active), device=nll_reads.device)
    nll_mask, kl_mask = slot[nll_reads[:, 2]] >= 0, slot[kl_reads[:, 2]] >= 0
    return slot, nll_mask, kl_mask, torch.cat([nll_reads[nll_mask], kl_reads[kl_mask]])


def _moving_on(
    opts: ValueOptions, active: list[int], nll: torch.Tensor, totals: torch.Tensor
) -> list[int]:
    """The active requests that take another step: those whose target NLL (with
    `early_stop_on_total`, total loss) is not yet below `early_stop_nll`."""
    watched = (totals if opts.early_stop_on_total else nll).detach()
    return [r for s, r in enumerate(active) if not float(watched[s]) < opts.early_stop_nll]


def _read_states(
    lm: LoadedModel,
    opts: ValueOptions,
    rows: Rows,
    frozen: Frozen | None,
    active: list[int],
    slot: torch.Tensor,
    active_deltas: torch.Tensor,
    reads: torch.Tensor,
) -> torch.Tensor:
    """The block outputs at `opts.loss_layer` at each read (row, column, owner), in the reads'
    order, each row with its request's δ (active_deltas[slot[owner]]) added: one pass per group of
    the active requests' rows (`Rows.groups`)."""
    device = lm.device
    split = torch.as_tensor(rows.split, device=device)
    group_of = torch.full((len(rows.tokens),), -1, device=device)
    place = torch.zeros(len(rows.tokens), dtype=torch.long, device=device)
    states, order = [], []
    still = set(active)
    active_rows = [row for row, owner in enumerate(rows.owner) if owner in still]
    for g, members in enumerate(rows.groups(active_rows, opts.whole_rows)):
        index = torch.as_tensor(members, device=device)
        group_of[index] = g
        place[index] = torch.arange(len(members), device=device)
        owners = slot[torch.as_tensor([rows.owner[r] for r in members], device=device)]
        hidden = _run_rows(lm, opts, rows, frozen, members, active_deltas[owners])
        in_group = (group_of[reads[:, 0]] == g).nonzero().squeeze(-1)
        r, c = reads[in_group, 0], reads[in_group, 1]
        states.append(hidden[place[r], c - split[r]])
        order.append(in_group)
    return torch.cat(states)[torch.argsort(torch.cat(order))]


def _losses(
    opts: ValueOptions,
    logits: torch.Tensor,
    owner: torch.Tensor,
    nll_tokens: torch.Tensor,
    kl_init: torch.Tensor | None,
    norms: torch.Tensor,
    ref_sq: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The module docstring's loss of each active request, from the logits of its NLL reads (one
    per entry of `nll_tokens`) then its KL reads, `owner` giving each read's request (its slot):
    (mean NLL, total loss, the KL reads' log-probabilities). `kl_init` holds the KL reads'
    original log-probabilities; None at the first pass (δ = 0), where they are these. `norms`:
    ‖δ‖, `ref_sq`: ‖v₀‖², per request."""
    n_active, n_nll = len(norms), len(nll_tokens)
    # Fused log-softmax + NLL: no (reads, vocab) log-probabilities to keep for backward.
    token_nll = F.cross_entropy(logits[:n_nll], nll_tokens, reduction="none")
    zeros = torch.zeros(n_active, device=logits.device, dtype=logits.dtype)
    per_request = zeros.index_add(0, owner[:n_nll], token_nll)
    nll = per_request / torch.bincount(owner[:n_nll], minlength=n_active)  # mean over tokens
    kl_log_probs, kl_owner = logits[n_nll:].log_softmax(-1), owner[n_nll:]
    original = kl_log_probs.detach() if kl_init is None else kl_init
    # KL(current ‖ original) on the "{} is a" prompts keeps what the subject is.
    kl_terms = (kl_log_probs.exp() * (kl_log_probs - original)).sum(-1)
    kl = zeros.index_add(0, kl_owner, kl_terms)
    kl = kl / torch.bincount(kl_owner, minlength=n_active)
    decay = opts.weight_decay * norms / ref_sq
    return nll, nll + opts.kl_factor * kl + decay, kl_log_probs


def _step(
    optimisers: list[torch.optim.Adam],
    deltas: list[torch.Tensor],
    max_norms: torch.Tensor,
    requests: list[int],
) -> None:
    """One Adam step of each given request's δ, then δ back into its ball ‖δ‖ ≤ max_norms[r]."""
    for r in requests:
        optimisers[r].step()
        optimisers[r].zero_grad(set_to_none=True)
        with torch.no_grad():
            norm = deltas[r].norm()
            if norm > max_norms[r]:
                deltas[r].mul_(max_norms[r] / norm)


# --------------------------------------------------------------------------------------------
# Reusing optimised values


class ValueStore(Protocol):
    """Where optimised values are kept between runs, by `value_key` (the app keeps them on disk).
    A row is {"delta": list of floats, "nll": float, "steps": int}."""

    def get(self, key: str) -> dict | None: ...

    def put(self, rows: dict[str, dict]) -> None: ...


def edited_weights_digest(lm: LoadedModel) -> str:
    """A fingerprint of every layer's MLP output projection (the weights every editor here
    changes), so a model carrying earlier edits never matches the unedited one: each weight times
    a fixed random vector, in float64 on its device, hashed. Any edit ΔW with ΔW r ≠ 0 changes
    it, and only d numbers per layer leave the device (no copy of the weights, no hash of them)."""
    generator = torch.Generator().manual_seed(0)
    digest = hashlib.sha256()
    for layer in range(lm.n_layers):
        weight = lm.mlp_out_weight(layer).detach()
        probe = torch.randn(weight.shape[1], generator=generator, dtype=torch.float64)
        digest.update((weight.double() @ probe.to(weight.device)).cpu().numpy().tobytes())
    return digest.hexdigest()


def value_key(lm: LoadedModel, request: PreparedRequest, opts: ValueOptions, weights: str) -> str:
    """What a request's optimised δ depends on: the model (identity, dtype, `weights` from
    `edited_weights_digest`), where and how δ is optimised, and every token row it is optimised
    on. Two editors with the same z (MEMIT, EMMET and AlphaEdit at the same top layer) share it."""
    description = {
        "model": identity_of(lm),
        "dtype": str(lm.dtype),
        "weights": weights,
        "options": dataclasses.asdict(opts),
        "rows": [
            request.target,
            request.contexts,
            request.context_subject,
            request.kl,
            request.kl_subject,
            request.bare,
            request.bare_subject,
        ],
    }
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:32]
