"""FT and FT-L (the ROME paper's fine-tuning baselines; kmeng01/rome `baselines/ft`).

Adam trains the (out, in) weight W of one layer's MLP output projection so that the prompt
continues with the new target; W − W0 is the edit (`DenseUpdate`):

    loss(W) = mean over requests of  −(1/|o*|) Σ_j log P_W(o*_j | prompt, o*_<j)   (teacher forced)
    FT-L:     after every step  W ← W0 + clamp(W − W0, −ε, ε)          ε = `norm_constraint`

With the reference's settings: 25 steps, lr 5e-4, no weight decay; a step is skipped while the
loss is below `skip_step_below` (1e-2), and training stops once the mean loss of a pass over the
requests is below `early_stop_below` (1e-2). The clamp runs after every step, skipped or not.

`independent` trains one request at a time, each from W0: every case trains its own weights, so
cases cannot share forward passes as ROME's v* does (scoring still carries each case's dense
update as a per-row hook). `joint` is FT for mass editing: one training run on all requests,
`batch_size` per step (an epoch of steps per "step" of `steps`, as the reference), one update.

Departures from the reference code, named:
  - Only the weight is trained, never the bias (the final reference code trains c_proj's bias
    too; its pre-refactor version, used for the paper, trained the weight alone).
  - `loss="teacher_forced"` (default) is the paper's NLL of the target, as the pre-refactor code
    computed it. `loss="last_token"` reproduces the final code: every target token's
    log-probability is read at the last prompt position (a bag of tokens, no teacher forcing).
  - Adam updates a float32 copy of W (float64 for a float64 model), written into the model after
    each step (identical for a float32 model; in bf16/fp16, steps of lr 5e-4 would otherwise
    round away).
  - A request whose target already is the greedy answer is refused, as every editor here does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from pipeline.core.editing.editor import Editor, Indexed, JointEdit
from pipeline.core.editing.ranges import Range, at_least, check_ranges, positive
from pipeline.core.editing.requests import EditResult, PreparedRequest, prepare_all
from pipeline.core.editing.updates import DenseUpdate, preserved_weights
from pipeline.core.models import LoadedModel, check_layers
from pipeline.core.tokens import right_pad

LOSSES = ("teacher_forced", "last_token")


@dataclass
class FtHparams:
    """FT's hyperparameters; defaults are the reference's for GPT-2 XL (hparams/FT/*.json):
    FT trains layer 1 unconstrained; FT-L layer 0 with `norm_constraint` 5e-4."""

    layer: int = 1  # presets per model: conf/editor/ft.yaml, ft-l.yaml
    steps: int = 25  # passes over the requests (one optimiser step each for one request)
    lr: float = 5e-4
    weight_decay: float = 0.0  # Adam's (coupled, L2) weight decay
    norm_constraint: float | None = None  # ε of FT-L's L∞ box around W0; None: FT
    loss: str = "teacher_forced"  # or last_token (the final reference code; see the module)
    skip_step_below: float = 1e-2  # no optimiser step while the batch loss is below this
    early_stop_below: float = 1e-2  # stop once a pass's mean loss is below this
    batch_size: int = 64  # requests per step in `joint` (the memit repo's FT; rome's: 128)
    reject_already_predicted: bool = True

    RANGES: ClassVar[dict[str, Range]] = {
        "steps": at_least(1, "passes over the requests: 0 trains nothing (no edit)"),
        "lr": positive("Adam's step size: at 0 the weight never moves (no edit)"),
        "norm_constraint": positive("ε of the box |W − W0| ≤ ε: at 0 every step is undone"),
    }

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        check_ranges(self, self.RANGES)


@dataclass
class _Batch:
    """Rows of some requests and where each target token's log-probability is read."""

    ids: torch.Tensor
    mask: torch.Tensor
    rows: torch.Tensor  # per read: the batch row
    cols: torch.Tensor  # per read: the position whose next-token distribution is read
    tokens: torch.Tensor  # per read: the target token
    owners: torch.Tensor  # per read: the request (within the batch)
    n: int  # requests


def _batch(lm: LoadedModel, prepared: Sequence[PreparedRequest], loss: str) -> _Batch:
    sequences, reads = [], []
    for i, p in enumerate(prepared):
        last = len(p.bare) - 1
        if loss == "teacher_forced":  # position last + j predicts target token j
            sequences.append(p.bare + p.target[:-1])
            reads += [(i, last + j, t, i) for j, t in enumerate(p.target)]
        else:  # every target token read at the last prompt position
            sequences.append(p.bare)
            reads += [(i, last, t, i) for t in p.target]
    pad_id = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    ids, mask = right_pad(sequences, pad_id, lm.device)
    rows, cols, tokens, owners = (
        torch.as_tensor(c, device=lm.device) for c in zip(*reads, strict=True)
    )
    return _Batch(ids, mask, rows, cols, tokens, owners, len(prepared))


def _losses(lm: LoadedModel, batch: _Batch) -> torch.Tensor:
    """Each request's mean NLL over its target tokens, (n,) in float32 or wider, differentiable."""
    hidden = lm.model.base_model(input_ids=batch.ids, attention_mask=batch.mask).last_hidden_state
    logits = lm.module("unembed")(hidden[batch.rows, batch.cols])
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    nll = -logits.log_softmax(-1)[torch.arange(len(batch.tokens)), batch.tokens]
    zeros = torch.zeros(batch.n, device=nll.device, dtype=nll.dtype)
    sums = zeros.index_add(0, batch.owners, nll)
    counts = zeros.index_add(0, batch.owners, torch.ones_like(nll))
    return sums / counts


def fine_tune(
    lm: LoadedModel, prepared: Sequence[PreparedRequest], hp: FtHparams
) -> tuple[torch.Tensor, list[float], int]:
    """Train W on `prepared` from the model's current W0: (W − W0 as (out, in), each request's
    NLL at the last forward pass, optimiser steps). The model is left exactly as it was."""
    module = lm.module("mlp_out", hp.layer)
    weight = module.weight
    chunks = [prepared[i : i + hp.batch_size] for i in range(0, len(prepared), hp.batch_size)]
    batches = [_batch(lm, chunk, hp.loss) for chunk in chunks]
    nlls = [float("nan")] * len(prepared)
    steps = 0
    trained = weight.requires_grad
    with preserved_weights(lm, [hp.layer]):
        original = lm.mlp_out_weight(hp.layer).detach().clone()
        # Adam updates a master copy of W in float32, or wider for a float64 model (the tests'
        # exact comparisons run in float64).
        master_dtype = torch.promote_types(weight.dtype, torch.float32)
        start = weight.detach().to(master_dtype, copy=True)  # W0
        master = start.clone()
        optimiser = torch.optim.Adam([master], lr=hp.lr, weight_decay=hp.weight_decay)
        try:
            weight.requires_grad_(True)
            for _ in range(hp.steps):
                total = 0.0
                for offset, batch in zip(
                    range(0, len(prepared), hp.batch_size), batches, strict=True
                ):
                    losses = _losses(lm, batch)
                    loss = losses.mean()
                    if loss.item() >= hp.skip_step_below:
                        # autograd.grad touches no .grad but master's: nothing else in the
                        # model changes, whatever else requires grad.
                        (grad,) = torch.autograd.grad(loss, [weight])
                        master.grad = grad.to(master_dtype)
                        optimiser.step()
                        master.grad = None
                        steps += 1
                    with torch.no_grad():
                        if hp.norm_constraint is not None:
                            eps = hp.norm_constraint
                            torch.minimum(
                                torch.maximum(master, start - eps), start + eps, out=master
                            )
                        weight.copy_(master)
                    total += loss.item() * batch.n
                    nlls[offset : offset + batch.n] = losses.detach().tolist()
                if total / len(prepared) < hp.early_stop_below:
                    break
        finally:
            weight.requires_grad_(trained)
        delta = lm.mlp_out_weight(hp.layer).detach() - original
    return delta, nlls, steps


class FineTune(Editor):
    """FT (or FT-L, with `norm_constraint`) at one layer's MLP output projection."""

    joint_solve = True

    def __init__(self, lm: LoadedModel, hparams: FtHparams):
        check_layers(lm.n_layers, layer=hparams.layer)
        self.hparams = hparams
        self.name = "ft" if hparams.norm_constraint is None else "ft-l"
        self.layer = hparams.layer % lm.n_layers
        self.layers = (self.layer,)

    def _prepare(self, lm: LoadedModel, requests: Indexed):
        return prepare_all(lm, requests, ["{}"], (), self.hparams.reject_already_predicted)

    def _update(self, lm: LoadedModel, delta: torch.Tensor) -> DenseUpdate:
        return DenseUpdate(self.layer, delta.to(lm.dtype))

    @staticmethod
    def _info(delta: torch.Tensor) -> dict:
        return {"update_norm": float(delta.norm()), "max_abs_change": float(delta.abs().max())}

    def independent(self, lm: LoadedModel, requests: Indexed) -> list[EditResult]:
        """One request at a time, each trained from the model's current weights."""
        prepared, results = self._prepare(lm, requests)
        for p in prepared:
            delta, (nll,), steps = fine_tune(lm, [p], self.hparams)
            results[p.index] = EditResult(
                p.index,
                p.request,
                update=self._update(lm, delta),
                target_nll=nll,
                steps=steps,
                info=self._info(delta),
            )
        return [results[index] for index, _ in requests]

    def joint(self, lm: LoadedModel, requests: Indexed) -> JointEdit:
        """One training run on every request together: one `DenseUpdate`."""
        prepared, results = self._prepare(lm, requests)
        updates: list[DenseUpdate] = []
        info: dict = {}
        if prepared:
            delta, nlls, steps = fine_tune(lm, prepared, self.hparams)
            updates = [self._update(lm, delta)]
            info = self._info(delta)
            for p, nll in zip(prepared, nlls, strict=True):
                results[p.index] = EditResult(p.index, p.request, target_nll=nll, steps=steps)
        return JointEdit(updates, [results[index] for index, _ in requests], info)
