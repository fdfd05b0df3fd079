"""KN, knowledge neurons (Dai et al. 2022) as the ROME paper's baseline (kmeng01/rome `baselines/kn`).

Attribution: for the rewrite prompt, at its last token, the MLP neurons of every layer l (the
activations a_l ∈ R^{d_k} at the MLP's hidden layer) get integrated-gradients scores for the
probability of the true answer o:

    score_l = a_l ⊙ (1/m) Σ_{k=1..m} ∂P(o | a_l ← α_k a_l) / ∂(α_k a_l)      α = linspace(0, 1, m)

(m = `steps` = 20; only layer l's activation at the last token is replaced). Neurons with
score > `adaptive_threshold` (0.2) × the largest score over all layers are selected.

Edit (the reference's "edit" mode): every selected neuron's output weights, column i of the
(out, in) projection W_l, move by the same vector

    v = −2 · E[t_top] + 1 · Σ_{t ∈ o*} E[t]

where t_top is the unedited model's top prediction after the prompt and E the unembedding.
The columns of one layer moving by one v is ΔW_l = v ⊗ 1_S (S: the layer's selected neurons),
so the edit is held exactly as one `RankOneUpdate` per layer touched (a list).

The reference scores layer by layer, one pass of m scaled copies each over the whole prompt; here
the (layer, α) rows are packed `batch_size` to a pass, several layers per pass, and each row runs
only the last token on the clean pass's keys and values of the tokens before it (a replacement at
the last token cannot change them: attention is causal). The scores are the same to float
rounding (tests/test_kn.py checks them against a loop over α on whole prompts);
`reuse_prefix=False` runs whole prompts as the reference does, for `scripts/bench_kn.py`. KN has no
joint solve: `joint` writes requests one after another (`Editor.joint`), as the reference's
mass-editing runs would.

Departures from the reference code, named (the reference setting is one switch away):
  - `neurons="key"` (default) scores the projection's input, the post-activation hidden units
    Dai et al. define; "pre_activation" scores the activation function's input, the pre-GELU
    c_fc output the reference hooks (for a gated MLP: the gate's pre-activation).
  - `answer_tokens="first"` attributes P(first token of o); "all" averages the scores of every
    token of o, each read at the last prompt position (the reference's multi-token behaviour).
  - `leading_space=True` tokenizes targets as they follow the prompt (" Paris"), as every editor
    here; False encodes the bare string, as the reference does ("Paris": another token in GPT-2).
  - E is the family registry's `unembed` weight; the reference uses GPT-2's input embedding,
    which is the same matrix there (tied), and the output side is what v must write into.
  - Requests whose target already is the greedy answer are refused, as every editor here does.
One prompt and no refinement over paraphrases, as the reference (`refine` false; the paper keeps
neurons shared by a fraction p of several prompts).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn
from transformers import DynamicCache

from pipeline.core import kvcache
from pipeline.core.editing.editor import Editor, Indexed
from pipeline.core.editing.ranges import Range, at_least, check_ranges
from pipeline.core.editing.requests import EditRequest, EditRequestError, EditResult, prepare_all
from pipeline.core.editing.updates import RankOneUpdate
from pipeline.core.models import LoadedModel
from pipeline.core.tokens import target_ids

NEURONS = ("key", "pre_activation")
ANSWER_TOKENS = ("first", "all")


@dataclass
class KnHparams:
    """KN's hyperparameters; defaults are the reference's (hparams/KN/gpt2-xl.json) with the
    departures of the module docstring. KN picks its neurons in every layer: no layer setting."""

    steps: int = 20  # integration steps m (α from 0 to 1, both included)
    batch_size: int = 20  # (layer, α) rows per forward pass; 20 = one layer per pass (reference)
    adaptive_threshold: float = 0.2  # keep scores above this fraction of the largest
    neurons: str = "key"  # key (projection input) or pre_activation (the reference)
    answer_tokens: str = "first"  # first, or all (the reference)
    leading_space: bool = True  # False: targets encoded without their leading space (reference)
    erase_scale: float = 2.0  # v subtracts this times the current top prediction's embedding
    write_scale: float = 1.0  # and adds this times each new target token's embedding
    reject_already_predicted: bool = True
    reuse_prefix: bool = True  # False: every row runs the whole prompt (the reference; slower)

    RANGES: ClassVar[dict[str, Range]] = {
        "steps": at_least(1, "integration steps of α from 0 to 1: none attributes nothing"),
        "adaptive_threshold": Range(
            0,
            1,
            "neurons scoring above it × the largest score are kept: at ≥ 1 none is (the "
            "update is exactly 0), below 0 neurons that count against the answer are",
            low_closed=True,
        ),
    }

    def __post_init__(self):
        if self.neurons not in NEURONS:
            raise ValueError(f"neurons must be one of {NEURONS}, got {self.neurons!r}")
        if self.answer_tokens not in ANSWER_TOKENS:
            raise ValueError(
                f"answer_tokens must be one of {ANSWER_TOKENS}, got {self.answer_tokens!r}"
            )
        if self.batch_size < 1:
            raise ValueError("batch_size must be positive")
        check_ranges(self, self.RANGES)


def activation_module(mlp: nn.Module) -> nn.Module:
    """The MLP's activation function: its one child without parameters that is not dropout."""
    found = [
        child
        for child in mlp.children()
        if not isinstance(child, nn.Dropout) and next(child.parameters(), None) is None
    ]
    if len(found) != 1:
        raise ValueError(f"cannot tell the activation function of {type(mlp).__name__}")
    return found[0]


def neuron_sites(lm: LoadedModel, neurons: str) -> list[nn.Module]:
    """Per layer, the module whose first input holds the neurons' activations."""
    if neurons == "key":
        return [lm.module("mlp_out", layer) for layer in range(lm.n_layers)]
    return [activation_module(lm.module("mlp", layer)) for layer in range(lm.n_layers)]


def _replacer(rows: torch.Tensor, position: int, values: torch.Tensor):
    """A forward pre-hook putting values[i] at (rows[i], position) of the module's input."""

    def replace(module, args):
        x = args[0].clone()
        x[rows, position] = values.to(x.dtype)
        return (x, *args[1:])

    return replace


def neuron_scores(
    lm: LoadedModel, prompt: Sequence[int], answer: Sequence[int], hp: KnHparams
) -> tuple[torch.Tensor, int]:
    """Integrated-gradients scores (n_layers, d_k) float32 of every neuron at the prompt's last
    token for P(answer) (the mean over `answer`'s tokens, all read after the prompt), and the
    unedited model's top prediction there."""
    sites = neuron_sites(lm, hp.neurons)
    last = len(prompt) - 1
    body = lm.model.base_model
    ids = torch.tensor([list(prompt)], device=lm.device)
    captured: dict[int, torch.Tensor] = {}

    def capture(layer):
        def grab(module, args):
            captured[layer] = args[0][0, last].detach()

        return grab

    handles = [site.register_forward_pre_hook(capture(i)) for i, site in enumerate(sites)]
    clean_cache = DynamicCache()
    try:
        with torch.no_grad():
            hidden = body(input_ids=ids, **kvcache.with_cache(body, clean_cache))
            top = int(lm.module("unembed")(hidden.last_hidden_state[0, last]).float().argmax())
    finally:
        for handle in handles:
            handle.remove()
    # Replacing an activation at the last token leaves every earlier position as it was
    # (attention is causal): the scaled rows run that one token, on the clean keys and values.
    prefix = [(k[:, :, :last], v[:, :, :last]) for k, v in kvcache.pairs(clean_cache)]
    base = torch.stack([captured[layer] for layer in range(lm.n_layers)])  # (L, d_k)
    alphas = torch.linspace(0, 1, hp.steps, device=lm.device)
    pairs = torch.cartesian_prod(
        torch.arange(lm.n_layers, device=lm.device), torch.arange(hp.steps, device=lm.device)
    )
    answer_ids = torch.as_tensor(list(answer), device=lm.device)
    gradient_sums = torch.zeros(base.shape, dtype=torch.float32, device=lm.device)
    for start in range(0, len(pairs), hp.batch_size):
        layers, steps = pairs[start : start + hp.batch_size].unbind(-1)
        rows = len(layers)
        scaled = (base[layers] * alphas[steps, None].to(base.dtype)).requires_grad_(True)
        start_at = last if hp.reuse_prefix else 0  # the first position the rows compute
        hooks = []
        for layer in layers.unique().tolist():
            members = (layers == layer).nonzero().squeeze(-1)
            hooks.append((sites[layer], _replacer(members, last - start_at, scaled[members])))
        inputs = {}
        if hp.reuse_prefix:
            cache = kvcache.from_pairs(
                [(k.expand(rows, -1, -1, -1), v.expand(rows, -1, -1, -1)) for k, v in prefix]
            )
            positions = torch.full((rows, 1), last, device=lm.device)
            inputs = {"position_ids": positions, **kvcache.with_cache(body, cache)}
        handles = [module.register_forward_pre_hook(hook) for module, hook in hooks]
        try:
            hidden = body(input_ids=ids[:, start_at:].expand(rows, -1), **inputs)
        finally:
            for handle in handles:
                handle.remove()
        probs = lm.module("unembed")(hidden.last_hidden_state[:, -1]).float().softmax(-1)
        objective = probs[:, answer_ids].mean(-1).sum()  # rows are independent: one backward
        (grad,) = torch.autograd.grad(objective, [scaled])
        gradient_sums.index_add_(0, layers, grad.float())
    return base.float() * gradient_sums / hp.steps, top


def select_neurons(scores: torch.Tensor, adaptive_threshold: float) -> torch.Tensor:
    """(n_layers, d_k) bool: scores above adaptive_threshold × the largest score."""
    return scores > adaptive_threshold * scores.max()


class KnowledgeNeurons(Editor):
    """KN: attribute the true answer to MLP neurons, then rewrite their output weights."""

    name = "kn"

    def __init__(self, lm: LoadedModel, hparams: KnHparams):
        self.hparams = hparams
        self.layers = tuple(range(lm.n_layers))

    def _tokens(self, lm: LoadedModel, field: str, request: EditRequest, index: int) -> list[int]:
        """The token ids of request.<field> (target_true or target_new), or its error."""
        text = getattr(request, field)
        try:
            if text is None:
                raise ValueError("missing: KN attributes the true answer's neurons")
            if self.hparams.leading_space:
                return target_ids(lm.tokenizer, text, request.filled)
            ids = lm.tokenizer(text, add_special_tokens=False)["input_ids"] if text.strip() else []
            if not ids:
                raise ValueError("tokenizes to nothing")
            return ids
        except ValueError as error:
            request_id = request.id if request.id is not None else index
            raise EditRequestError(index, request_id, f"{field} {text!r}: {error}") from None

    def independent(self, lm: LoadedModel, requests: Indexed) -> list[EditResult]:
        hp = self.hparams
        prepared, results = prepare_all(lm, requests, ["{}"], (), hp.reject_already_predicted)
        unembedding = lm.module("unembed").weight.detach()  # (vocab, d): E
        for p in prepared:
            request = p.request
            try:
                true = self._tokens(lm, "target_true", request, p.index)
                new = self._tokens(lm, "target_new", request, p.index)
            except EditRequestError as error:
                results[p.index] = EditResult(p.index, request, error=error)
                continue
            answer = true if hp.answer_tokens == "all" else true[:1]
            scores, top = neuron_scores(lm, p.bare, answer, hp)
            selected = select_neurons(scores, hp.adaptive_threshold)
            v = hp.write_scale * unembedding[new].float().sum(0)
            v = v - hp.erase_scale * unembedding[top].float()
            updates = [
                RankOneUpdate(layer, v.to(lm.dtype), selected[layer].to(lm.dtype))
                for layer in range(lm.n_layers)
                if selected[layer].any()
            ]
            count = int(selected.sum())
            results[p.index] = EditResult(
                p.index,
                request,
                update=updates,
                info={
                    "neurons": count,
                    "layers": [u.layer for u in updates],
                    "top_token": top,
                    "update_norm": float(v.norm()) * count**0.5,  # ‖ΔW‖ over all layers
                },
            )
        return [results[index] for index, _ in requests]
