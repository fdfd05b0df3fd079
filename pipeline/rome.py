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
  - r-ROME (True) uses k̄ everywhere: k_ref = k̄ and v* = W k̄ + δ, so the update maps exactly the
    key it was fitted for.
In both, δ is the same optimised residual: it is added to the projection's output at the
subject's last token of every (context + prompt) during the v* optimisation.

An update is held as `RankOneUpdate(layer, left, right)` with ΔW = left ⊗ right (out, in):
`left` = (v* − W k_ref) / (uᵀ k_ref) lives in the output space, `right` = u in the key space.
(ROME's own code names them the other way round because GPT-2 stores W transposed.)
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from pipeline.models import LoadedModel
from pipeline.second_moment import SecondMoment, StopForward, run_until_stopped
from pipeline.tokens import SubjectNotFoundError, encode, fill, right_pad, subject_span, target_ids

log = logging.getLogger(__name__)


@dataclass
class RomeHparams:
    """ROME's hyperparameters; defaults are the paper's for GPT-2 XL (GPT-J uses layer 5).

    `context_templates` lists (length, count) pairs: the model writes `count` prefixes of
    `length` new tokens from the seed words, and "{}" (no prefix) comes first. The ROME code used
    5 prefixes of 10 tokens; the MEMIT code 10 of 5 and 10 of 10 tokens from these seed words,
    which we take as default: 21 templates average more of the prefix noise out of k̄ and v*.

    Choices where paper and reference code differ, or the code is unspecific: the KL term reads
    the next-token distribution after the whole "{} is a" prompt (the paper's equation; the code
    reads it at the subject's last token); the early stop looks at the target's NLL (the code at
    the total loss); weight decay is v_weight_decay · ‖δ‖ / ‖W k_ref + b‖² as in the code.
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
    mom2_update_weight: float = 15000.0  # λ in (λC)⁻¹; cancels in ROME, kept for parity
    mom2_ridge: float = 1e-6  # ridge relative to mean(diag(λC)), keeps the solve defined
    reject_already_predicted: bool = True  # a target the model already gives is no edit
    # How, not what (the same v* up to float rounding): False runs the tokens before each row's
    # subject once, reusing their keys and values at every v* step, and batches rows of equal
    # length together; True runs every row whole, in one padded batch, at every step, as the
    # reference code does (benchmarks compare the two).
    v_whole_rows: bool = False

    def __post_init__(self):
        """Lists from a YAML config become tuples, so equal settings compare equal."""
        self.context_templates = tuple(
            tuple(int(x) for x in pair) for pair in self.context_templates
        )
        self.context_seeds = tuple(self.context_seeds)
        self.kl_prompts = tuple(self.kl_prompts)

    @classmethod
    def for_editor(cls, name: str, **overrides) -> RomeHparams:
        """`rome` (original keys) or `r-rome` (consistent keys), with overrides."""
        variants = {"rome": False, "r-rome": True}
        if name not in variants:
            raise ValueError(f"editor must be one of {sorted(variants)}, got {name!r}")
        return cls(consistent_keys=variants[name], **overrides)


@dataclass(frozen=True)
class EditRequest:
    """Rewrite `prompt` (a "{}" template for the subject) to continue with `target_new`."""

    prompt: str
    subject: str
    target_new: str
    target_true: str | None = None
    id: str | int | None = None

    @classmethod
    def from_filled(cls, prompt: str, subject: str, target_new: str, **extra) -> EditRequest:
        """From a prompt with the subject written in (CounterFact/EasyEdit records): the
        subject's last occurrence becomes the "{}"."""
        at = prompt.rfind(subject) if subject else -1
        if at < 0:
            raise SubjectNotFoundError(f"subject {subject!r} not found in prompt {prompt!r}")
        template = prompt[:at] + "{}" + prompt[at + len(subject) :]
        return cls(template, subject, target_new, **extra)

    @property
    def filled(self) -> str:
        return fill(self.prompt, self.subject)


class EditRequestError(ValueError):
    """A request that cannot be edited; carries which one and why."""

    def __init__(self, index: int, request_id: object, reason: str):
        self.index, self.request_id, self.reason = index, request_id, reason
        super().__init__(f"edit request {index} (id={request_id}): {reason}")


@dataclass
class RankOneUpdate:
    """ΔW = left ⊗ right for the (out, in) weight of `mlp_out` at `layer`."""

    layer: int
    left: torch.Tensor  # (out,)
    right: torch.Tensor  # (in,)

    def matrix(self) -> torch.Tensor:
        return torch.outer(self.left, self.right)


@dataclass
class EditResult:
    """One request's outcome: an update, or the error that rejected it."""

    index: int
    request: EditRequest
    update: RankOneUpdate | None = None
    error: EditRequestError | None = None
    key: torch.Tensor | None = None  # k_ref: the key the update maps exactly onto `value`
    value: torch.Tensor | None = None  # v* = W k_ref + δ (the projection's linear part)
    target_nll: float = float("nan")  # mean NLL per target token when optimisation stopped
    steps: int = 0  # optimiser steps taken
    info: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.error is None


# --------------------------------------------------------------------------------------------
# Context templates


@torch.no_grad()
def generate_context_templates(
    lm: LoadedModel,
    lengths: Sequence[tuple[int, int]] = ((5, 10), (10, 10)),
    *,
    seeds: Sequence[str] = ("The", "Therefore", "Because", "I", "You"),
    top_k: int = 5,
    seed: int = 0,
) -> list[str]:
    """["{}", "<generated text>. {}", ...]: prefixes the model writes itself from seed words.

    Top-k sampling from a seeded generator makes the list reproducible for a model; callers
    cache it per model. Prefix i starts from seed word i modulo the number of seeds.
    """
    generator = torch.Generator(device=lm.device).manual_seed(seed)
    templates = ["{}"]
    for length, count in lengths:
        for seed_index, word in enumerate(seeds):
            n = len(range(seed_index, count, len(seeds)))
            if n == 0:
                continue
            ids = torch.tensor([encode(lm.tokenizer, word)] * n, device=lm.device)
            for _ in range(length):
                logits = lm.model(input_ids=ids).logits[:, -1].float()
                top = logits.topk(top_k, dim=-1)
                pick = torch.multinomial(top.values.softmax(-1), 1, generator=generator)
                ids = torch.cat([ids, top.indices.gather(1, pick)], dim=1)
            for row in ids:
                text = lm.tokenizer.decode(row, skip_special_tokens=True)
                templates.append(text.replace("{", "").replace("}", "") + ". {}")
    return templates


def templates_for(lm: LoadedModel, hparams: RomeHparams) -> list[str]:
    return generate_context_templates(
        lm,
        hparams.context_templates,
        seeds=hparams.context_seeds,
        top_k=hparams.context_top_k,
        seed=hparams.context_seed,
    )


# --------------------------------------------------------------------------------------------
# Forward passes that stop early and read what they need


def _run_until(lm: LoadedModel, module: torch.nn.Module, ids, mask, **inputs) -> torch.Tensor:
    """Run the model until `module` has produced its output; return that output."""
    box: list[torch.Tensor] = []

    def grab(mod, args, output):
        box.append(output[0] if isinstance(output, tuple) else output)
        raise StopForward

    handle = module.register_forward_hook(grab)
    try:
        run_until_stopped(lm, ids, mask, **inputs)
    finally:
        handle.remove()
    return box[0]


@torch.no_grad()
def projection_inputs(
    lm: LoadedModel,
    layer: int,
    token_lists: Sequence[Sequence[int]],
    positions: Sequence[int],
    batch_size: int = 64,
) -> torch.Tensor:
    """Inputs of `mlp_out` at `layer` for sequence i at token positions[i]: (n, in)."""
    pad_id = lm.tokenizer.pad_token_id or 0
    out = []
    box: list[torch.Tensor] = []

    def grab(module, args):
        box.append(args[0])
        raise StopForward

    handle = lm.module("mlp_out", layer).register_forward_pre_hook(grab)
    try:
        for start in range(0, len(token_lists), batch_size):
            ids, mask = right_pad(token_lists[start : start + batch_size], pad_id, lm.device)
            box.clear()
            run_until_stopped(lm, ids, mask)
            rows = torch.arange(ids.shape[0], device=lm.device)
            cols = torch.as_tensor(positions[start : start + batch_size], device=lm.device)
            out.append(box[0][rows, cols])
    finally:
        handle.remove()
    return torch.cat(out)


def _logits_at(lm: LoadedModel, hidden: torch.Tensor) -> torch.Tensor:
    """Logits from block outputs (n, d): the final norm, then the unembedding."""
    return lm.module("unembed")(lm.module("final_norm")(hidden)).float()


# --------------------------------------------------------------------------------------------
# Preparing requests


@dataclass
class _Prepared:
    index: int
    request: EditRequest
    target: list[int]  # target token ids (in the context of the bare prompt)
    contexts: list[list[int]]  # (context + prompt) token ids, one per template
    context_subject: list[int]  # position of the subject's last token in each
    kl: list[list[int]]  # KL prompt token ids
    kl_subject: list[int]
    bare: list[int]  # the bare prompt's token ids
    bare_subject: int


def _prepare(
    lm: LoadedModel, index: int, request: EditRequest, templates: Sequence[str], hp: RomeHparams
) -> _Prepared:
    request_id = request.id if request.id is not None else index
    tok = lm.tokenizer

    def fail(reason: str):
        return EditRequestError(index, request_id, reason)

    if "{}" not in request.prompt:
        where = (
            "written in; use EditRequest.from_filled"
            if request.subject in request.prompt
            else "not found"
        )
        raise fail(f"subject {request.subject!r} {where}: prompt {request.prompt!r} has no '{{}}'")
    if not request.subject.strip():
        raise fail("subject is empty")

    def locate(template: str) -> tuple[list[int], int]:
        text = fill(template, request.subject)
        try:
            return encode(tok, text), subject_span(tok, text, request.subject)[1] - 1
        except SubjectNotFoundError as error:
            raise fail(str(error)) from None

    try:
        target = target_ids(tok, request.target_new, request.filled)
    except ValueError as error:
        raise fail(f"target_new {request.target_new!r}: {error}") from None
    if not target:
        raise fail(f"target_new {request.target_new!r} tokenizes to nothing")
    contexts = [locate(t.replace("{}", request.prompt)) for t in templates]
    kls = [locate(p) for p in hp.kl_prompts]
    bare, bare_subject = locate(request.prompt)
    return _Prepared(
        index,
        request,
        target,
        [c[0] for c in contexts],
        [c[1] for c in contexts],
        [k[0] for k in kls],
        [k[1] for k in kls],
        bare,
        bare_subject,
    )


@torch.no_grad()
def _already_predicted(lm: LoadedModel, prepared: Sequence[_Prepared]) -> list[bool]:
    """Whether greedy decoding of each bare prompt already yields the whole target."""
    if not prepared:
        return []
    rows = [p.bare + p.target[:-1] for p in prepared]
    ids, mask = right_pad(rows, lm.tokenizer.pad_token_id or 0, lm.device)
    hidden = _run_until(lm, lm.module("block", -1), ids, mask)
    answers = []
    for row, p in enumerate(prepared):
        cols = torch.arange(len(p.bare) - 1, len(p.bare) - 1 + len(p.target), device=lm.device)
        greedy = _logits_at(lm, hidden[row, cols]).argmax(-1).tolist()
        answers.append(greedy == p.target)
    return answers


# --------------------------------------------------------------------------------------------
# Keys, values, updates


class _KeySolver:
    """Computes u = (λC + εI)⁻¹ k in float64 with one Cholesky factorisation."""

    def __init__(
        self, moment: torch.Tensor | SecondMoment | None, hp: RomeHparams, device: torch.device
    ):
        self.factor = None
        if moment is None:
            return
        if isinstance(moment, SecondMoment):
            moment = moment.moment()
        scaled = hp.mom2_update_weight * moment.to(device, torch.float64)
        ridge = hp.mom2_ridge * scaled.diagonal().mean()
        scaled = scaled + ridge * torch.eye(
            scaled.shape[0], dtype=scaled.dtype, device=scaled.device
        )
        self.factor = torch.linalg.cholesky(scaled)

    def __call__(self, keys: torch.Tensor) -> torch.Tensor:
        """keys (n, in) -> left vectors u (n, in), float64, unit norm (the scale cancels)."""
        keys = keys.double()
        u = keys if self.factor is None else torch.cholesky_solve(keys.T, self.factor).T
        return u / u.norm(dim=-1, keepdim=True)


def _adder(rows: torch.Tensor, cols: torch.Tensor, deltas: torch.Tensor):
    """A forward hook adding deltas[i] to the output at (rows[i], cols[i])."""

    def add_delta(module, args, output):
        return output.index_put((rows, cols), deltas.to(output.dtype), accumulate=True)

    return add_delta


@dataclass
class _Rows:
    """The v* optimisation's rows, fixed for the whole optimisation.

    Row i is tokens[i] (context + prompt + target[:-1], or a KL prompt) of request owner[i]; δ is
    added at column subject[i]. Everything before that column is untouched by δ (causal
    attention), so the first `split[i]` tokens can run once (`_Prefixes`) and only the rest at
    every step. Rows with one `label` (one context template, or one KL prompt) start alike. The
    loss reads `reads` = (row, column, request), first the NLL reads (predicting `nll_tokens`),
    then the KL reads (the KL prompts' last tokens). `context_rows[r]` are request r's context
    rows, in template order.
    """

    tokens: list[list[int]] = field(default_factory=list)
    subject: list[int] = field(default_factory=list)
    owner: list[int] = field(default_factory=list)
    split: list[int] = field(default_factory=list)
    label: list[int] = field(default_factory=list)
    context_rows: list[list[int]] = field(default_factory=list)
    nll_reads: list[tuple[int, int, int]] = field(default_factory=list)
    nll_tokens: list[int] = field(default_factory=list)
    kl_reads: list[tuple[int, int, int]] = field(default_factory=list)

    @classmethod
    def build(cls, prepared: Sequence[_Prepared], whole_rows: bool) -> _Rows:
        rows = cls()

        def add(tokens: list[int], subject: int, owner: int, label: int) -> int:
            rows.tokens.append(tokens)
            rows.subject.append(subject)
            rows.owner.append(owner)
            rows.split.append(0 if whole_rows else subject)
            rows.label.append(label)
            return len(rows.tokens) - 1

        for r, p in enumerate(prepared):
            rows.context_rows.append([])
            for t, (tokens, pos) in enumerate(zip(p.contexts, p.context_subject, strict=True)):
                row = add(tokens + p.target[:-1], pos, r, t)
                rows.context_rows[r].append(row)
                first = len(tokens) - 1  # the logits there predict the first target token
                rows.nll_reads += [(row, first + i, r) for i in range(len(p.target))]
                rows.nll_tokens += p.target
            for k, (tokens, pos) in enumerate(zip(p.kl, p.kl_subject, strict=True)):
                row = add(tokens, pos, r, len(p.contexts) + k)
                rows.kl_reads.append((row, len(tokens) - 1, r))
        return rows

    def suffix_length(self, row: int) -> int:
        return len(self.tokens[row]) - self.split[row]

    def groups(self, rows: Sequence[int], whole_rows: bool) -> list[list[int]]:
        """The rows to run together at a step: rows of one length, so that nothing is padded
        (suffixes are short, 3 tokens on average for CounterFact and up to ~8: padding all to the
        longest would double the work). A group under `_GROUP_TOKENS` tokens takes the next
        length in too, since many small passes cost more than a little padding."""
        if whole_rows:
            return [list(rows)]
        groups: list[list[int]] = []
        current: list[int] = []
        tokens = 0  # in current
        for row in sorted(rows, key=self.suffix_length):
            length = self.suffix_length(row)
            if current and length > self.suffix_length(current[-1]) and tokens >= _GROUP_TOKENS:
                groups.append(current)
                current, tokens = [], 0
            current.append(row)
            tokens += length
        return [*groups, current] if current else groups


_GROUP_TOKENS = 64


def _shared_start(token_lists: Sequence[Sequence[int]]) -> list[int]:
    """The longest list of tokens that every one of token_lists starts with."""
    first = token_lists[0]
    length = min(len(tokens) for tokens in token_lists)
    for tokens in token_lists[1:]:
        length = next((i for i in range(length) if tokens[i] != first[i]), length)
    return list(first[:length])


@dataclass
class _Prefixes:
    """Keys and values, at every layer, of tokens that rows have already run: the past of what
    they run next. Entries may have holes between them (a shared start padded to its longest,
    then each row's own tokens): `mask` marks the real ones, which are in order, `lengths` counts
    them (the next token's position) and `ends` is one past the last. Unreal entries are zero,
    since 0 · NaN in attention would poison the sums."""

    key_values: list[tuple[torch.Tensor, torch.Tensor]]  # per layer (rows, heads, width, dim)
    mask: torch.Tensor  # (rows, width)
    lengths: torch.Tensor  # (rows,)
    ends: torch.Tensor  # (rows,)

    @classmethod
    def compute(cls, lm: LoadedModel, rows: _Rows) -> _Prefixes | None:
        """Each row's tokens before its split. The start that all rows of a label share (a
        context template's text: ~9 of the ~12 tokens before a CounterFact subject) runs once,
        then each row's own tokens run after it."""
        by_label: dict[int, list[int]] = {}
        for row, label in enumerate(rows.label):
            by_label.setdefault(label, []).append(row)
        starts: list[list[int]] = []
        start_of = [0] * len(rows.tokens)
        for members in by_label.values():
            befores = [rows.tokens[r][: rows.split[r]] for r in members]
            starts.append(_shared_start(befores) if len(members) > 1 else [])
            for r in members:
                start_of[r] = len(starts) - 1
        shared = cls.run(lm, starts)
        own = [
            rows.tokens[r][len(starts[start_of[r]]) : rows.split[r]]
            for r in range(len(rows.tokens))
        ]
        return cls.run(lm, own, shared, start_of)

    @classmethod
    @torch.no_grad()
    def run(
        cls,
        lm: LoadedModel,
        token_lists: Sequence[Sequence[int]],
        past: _Prefixes | None = None,
        past_rows: Sequence[int] | None = None,
    ) -> _Prefixes | None:
        """Run token_lists[i] after past row past_rows[i] (if a past is given), in batches of one
        length (nothing padded is computed); the result holds the past, then the new tokens."""
        device = lm.device
        by_length: dict[int, list[int]] = {}
        for i, tokens in enumerate(token_lists):
            if tokens:
                by_length.setdefault(len(tokens), []).append(i)
        lengths = torch.as_tensor([len(t) for t in token_lists], device=device)
        width = int(lengths.max()) if len(token_lists) else 0
        index = None if past is None else torch.as_tensor(past_rows, device=device)
        new: list[tuple[torch.Tensor, torch.Tensor]] = []
        for length, members in by_length.items():
            ids = torch.as_tensor([token_lists[i] for i in members], device=device)
            before = None if index is None else past.select(index[members])
            ids, mask, inputs = _inputs_after(before, ids, torch.ones_like(ids))
            _run_until(lm, lm.module("block", -1), ids, mask, **inputs)
            cache = inputs["past_key_values"]
            if not new:
                new = [
                    tuple(t.new_zeros(len(token_lists), t.shape[1], width, t.shape[3]) for t in kv)
                    for kv in ((layer.keys, layer.values) for layer in cache.layers)
                ]
            rows = torch.as_tensor(members, device=device)
            for (keys, values), layer in zip(new, cache.layers, strict=True):
                keys[rows, :, :length] = layer.keys[:, :, -length:]
                values[rows, :, :length] = layer.values[:, :, -length:]
        positions = torch.arange(width, device=device)
        new_mask = (positions < lengths[:, None]).long()
        if past is None:
            if not new:
                return None
            return cls(new, new_mask, lengths, lengths)
        old_width = int(past.ends[index].max())
        old = [(k[index, :, :old_width], v[index, :, :old_width]) for k, v in past.key_values]
        if new:
            old = [
                (torch.cat([k, nk], dim=2), torch.cat([v, nv], dim=2))
                for (k, v), (nk, nv) in zip(old, new, strict=True)
            ]
        ends = torch.where(lengths > 0, old_width + lengths, past.ends[index])
        mask = torch.cat([past.mask[index, :old_width], new_mask], dim=1)
        return cls(old, mask, past.lengths[index] + lengths, ends)

    def select(self, rows: torch.Tensor) -> tuple[DynamicCache, torch.Tensor, torch.Tensor]:
        """A fresh cache with these rows' entries (a forward pass extends it), their mask and
        their lengths, cut to the last entry any of them has."""
        width = int(self.ends[rows].max())
        if width == 0:
            return DynamicCache(), self.mask[rows, :0], self.lengths[rows]
        cache = DynamicCache([(k[rows, :, :width], v[rows, :, :width]) for k, v in self.key_values])
        return cache, self.mask[rows, :width], self.lengths[rows]


def _inputs_after(
    before: tuple[DynamicCache, torch.Tensor, torch.Tensor] | None,
    ids: torch.Tensor,
    mask: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Model inputs for running ids (right-padded, `mask`) after `before` (a selected past)."""
    if before is None:
        before = (
            DynamicCache(),
            mask[:, :0],
            torch.zeros(len(ids), dtype=torch.long, device=ids.device),
        )
    cache, past_mask, past_lengths = before
    positions = past_lengths[:, None] + torch.arange(ids.shape[1], device=ids.device)
    inputs = {"past_key_values": cache, "use_cache": True, "position_ids": positions}
    return ids, torch.cat([past_mask, mask], dim=1), inputs


@dataclass
class _Frozen:
    """What δ cannot change, computed once before v* is optimised: the prefixes' keys and values;
    for every token from the subject's last on, the input of the edited layer's block (δ enters
    in that block, so the blocks below it see the same at every step and then replay it instead
    of running); and each row's key (the projection's input at its subject, δ = 0)."""

    layer: int
    prefixes: _Prefixes | None
    block_inputs: torch.Tensor | None  # (rows, longest suffix, d); None if the layer is 0
    block_output: Callable[[torch.Tensor], object]  # a block input as a block's output looks
    keys: torch.Tensor  # (rows, in)

    @classmethod
    @torch.no_grad()
    def compute(cls, lm: LoadedModel, rows: _Rows, layer: int) -> _Frozen:
        prefixes = _Prefixes.compute(lm, rows)
        device, n = lm.device, len(rows.tokens)
        longest = max(map(rows.suffix_length, range(n)))
        seen: dict[str, object] = {}
        block_inputs = keys = None

        def grab_block_input(module, args, output):
            seen["block"] = output

        def grab_key(module, args):
            seen["key"] = args[0]
            raise StopForward

        hooks = [lm.module("mlp_out", layer).register_forward_pre_hook(grab_key)]
        if layer > 0:
            hooks.append(lm.module("block", layer - 1).register_forward_hook(grab_block_input))
        try:
            for members in rows.groups(range(n), whole_rows=False):
                ids, mask, inputs = _suffix_inputs(lm, rows, prefixes, members)
                run_until_stopped(lm, ids, mask, **inputs)
                index = torch.as_tensor(members, device=device)
                cols = torch.as_tensor(
                    [rows.subject[r] - rows.split[r] for r in members], device=device
                )
                key = seen["key"][torch.arange(len(members), device=device), cols]
                if keys is None:
                    keys = key.new_zeros(n, key.shape[-1])
                keys[index] = key
                if layer > 0:
                    state = seen["block"]
                    state = state[0] if isinstance(state, tuple) else state
                    if block_inputs is None:
                        block_inputs = state.new_zeros(n, longest, state.shape[-1])
                    block_inputs[index, : state.shape[1]] = state
        finally:
            for hook in hooks:
                hook.remove()
        output = seen.get("block")
        extra = len(output) - 1 if isinstance(output, tuple) else -1

        def block_output(state: torch.Tensor) -> object:
            return state if extra < 0 else (state, *([None] * extra))

        return cls(layer, prefixes, block_inputs, block_output, keys)


@contextlib.contextmanager
def _replaying(blocks: Sequence[torch.nn.Module], output: object) -> Iterator[None]:
    """The blocks return `output` instead of running (their result is known and unchanged)."""

    def replay(*args, **kwargs):
        return output

    # A block's own `forward` attribute (accelerate's device hooks set one) is put back after.
    saved = [block.__dict__.get("forward") for block in blocks]
    for block in blocks:
        block.forward = replay
    try:
        yield
    finally:
        for block, forward in zip(blocks, saved, strict=True):
            if forward is None:
                del block.forward
            else:
                block.forward = forward


def _suffix_inputs(
    lm: LoadedModel, rows: _Rows, prefixes: _Prefixes | None, members: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Model inputs for the given rows' tokens after their split, right-padded, after their
    prefixes."""
    suffixes = [rows.tokens[r][rows.split[r] :] for r in members]
    ids, mask = right_pad(suffixes, lm.tokenizer.pad_token_id or 0, lm.device)
    if prefixes is None:  # whole rows
        return ids, mask, {"position_ids": torch.arange(ids.shape[1], device=lm.device)[None]}
    return _inputs_after(prefixes.select(torch.as_tensor(members, device=lm.device)), ids, mask)


def _run_rows(
    lm: LoadedModel,
    hp: RomeHparams,
    rows: _Rows,
    frozen: _Frozen | None,
    members: list[int],
    deltas: torch.Tensor,
) -> torch.Tensor:
    """Block outputs at `hp.v_loss_layer` for the given rows' tokens after their split, with
    deltas[i] added to the projection's output at row members[i]'s subject: (rows, width, d)."""
    device = lm.device
    ids, mask, inputs = _suffix_inputs(lm, rows, frozen and frozen.prefixes, members)
    columns = torch.as_tensor([rows.subject[r] - rows.split[r] for r in members], device=device)
    replay = contextlib.nullcontext()
    if frozen is not None and frozen.block_inputs is not None:
        state = frozen.block_inputs[torch.as_tensor(members, device=device), : ids.shape[1]]
        below = [lm.module("block", i) for i in range(frozen.layer)]
        replay = _replaying(below, frozen.block_output(state))
    handle = lm.module("mlp_out", hp.layer).register_forward_hook(
        _adder(torch.arange(len(members), device=device), columns, deltas)
    )
    try:
        with torch.enable_grad(), replay:
            return _run_until(lm, lm.module("block", hp.v_loss_layer), ids, mask, **inputs)
    finally:
        handle.remove()


def _optimise_values(
    lm: LoadedModel,
    rows: _Rows,
    frozen: _Frozen | None,
    reference_outputs: torch.Tensor,
    hp: RomeHparams,
) -> tuple[torch.Tensor, list[float], list[int]]:
    """Optimise one residual δ per request (rows of a (B, out) tensor), all in one batch.

    Each request contributes its (context + prompt + target[:-1]) rows, teacher-forced on the
    target, and its KL rows; every row adds its own request's δ to the projection's output at
    the subject's last token. Requests are independent: their losses are summed, each has its own
    Adam state, and a request leaves the batch as soon as its target NLL is low enough. With
    `frozen` (see `_Frozen`), only what δ changes runs at each step; without, whole rows.
    """
    n_req = len(rows.context_rows)
    device = lm.device
    dim = reference_outputs.shape[1]
    deltas = [torch.zeros(dim, device=device, requires_grad=True) for _ in range(n_req)]
    optimisers = [torch.optim.Adam([d], lr=hp.v_lr) for d in deltas]
    max_norms = hp.clamp_norm_factor * reference_outputs.norm(dim=-1)
    ref_sq = reference_outputs.norm(dim=-1) ** 2
    split = torch.as_tensor(rows.split, device=device)
    nll_reads = torch.as_tensor(rows.nll_reads, device=device).view(-1, 3)
    nll_tokens = torch.as_tensor(rows.nll_tokens, device=device)
    kl_reads = torch.as_tensor(rows.kl_reads, device=device).view(-1, 3)
    kl_init = None  # the KL prompts' original distributions (δ = 0), one per KL read
    nlls = [float("nan")] * n_req
    steps = [0] * n_req
    active = list(range(n_req))

    for iteration in range(hp.v_num_grad_steps):
        is_active = torch.zeros(n_req, dtype=torch.bool, device=device)
        is_active[active] = True
        slot = torch.full((n_req,), -1, device=device)  # request -> its slot among the active
        slot[active] = torch.arange(len(active), device=device)
        active_deltas = torch.stack([deltas[r] for r in active])
        # The NLL reads, then the KL reads, of the requests still optimising.
        nll_mask, kl_mask = is_active[nll_reads[:, 2]], is_active[kl_reads[:, 2]]
        reads = torch.cat([nll_reads[nll_mask], kl_reads[kl_mask]])
        group_of = torch.full((len(rows.tokens),), -1, device=device)
        place = torch.zeros(len(rows.tokens), dtype=torch.long, device=device)
        states, order = [], []
        still = set(active)
        active_rows = [row for row, owner in enumerate(rows.owner) if owner in still]
        for g, members in enumerate(rows.groups(active_rows, hp.v_whole_rows)):
            index = torch.as_tensor(members, device=device)
            group_of[index] = g
            place[index] = torch.arange(len(members), device=device)
            owners = slot[torch.as_tensor([rows.owner[r] for r in members], device=device)]
            hidden = _run_rows(lm, hp, rows, frozen, members, active_deltas[owners])
            in_group = (group_of[reads[:, 0]] == g).nonzero().squeeze(-1)
            r, c = reads[in_group, 0], reads[in_group, 1]
            states.append(hidden[place[r], c - split[r]])
            order.append(in_group)
        states = torch.cat(states)[torch.argsort(torch.cat(order))]
        logits = _logits_at(lm, states)

        owner = slot[reads[:, 2]]
        n_active, n_nll = len(active), int(nll_mask.sum())
        # Fused log-softmax + NLL: no (reads, vocab) log-probabilities to keep for backward.
        token_nll = F.cross_entropy(logits[:n_nll], nll_tokens[nll_mask], reduction="none")
        per_request = torch.zeros(n_active, device=device).index_add(0, owner[:n_nll], token_nll)
        nll = per_request / torch.bincount(owner[:n_nll], minlength=n_active)  # mean over tokens
        kl_log_probs, kl_owner = logits[n_nll:].log_softmax(-1), owner[n_nll:]
        if kl_init is None:  # iteration 0: δ is still zero, the original distributions
            kl_init = kl_log_probs.detach()
        # KL(current ‖ original) on the "{} is a" prompts keeps what the subject is.
        kl_terms = (kl_log_probs.exp() * (kl_log_probs - kl_init[kl_mask])).sum(-1)
        kl = torch.zeros(n_active, device=device).index_add(0, kl_owner, kl_terms)
        kl = kl / torch.bincount(kl_owner, minlength=n_active)
        norms = torch.stack([deltas[r].norm() for r in active])
        decay = hp.v_weight_decay * norms / ref_sq[active]
        loss = (nll + hp.kl_factor * kl + decay).sum()  # requests are independent

        finished = set()
        for s, r in enumerate(active):
            nlls[r] = float(nll[s].detach())
            if nlls[r] < hp.early_stop_nll or iteration == hp.v_num_grad_steps - 1:
                finished.add(r)
        if iteration == hp.v_num_grad_steps - 1:
            break
        loss.backward()
        for r in active:
            if r in finished:
                continue
            optimisers[r].step()
            optimisers[r].zero_grad(set_to_none=True)
            steps[r] += 1
            with torch.no_grad():
                norm = deltas[r].norm()
                if norm > max_norms[r]:
                    deltas[r].mul_(max_norms[r] / norm)
        active = [r for r in active if r not in finished]
        if not active:
            break
    return torch.stack([d.detach() for d in deltas]), nlls, steps


def _keys(
    lm: LoadedModel,
    hp: RomeHparams,
    prepared: Sequence[_Prepared],
    rows: _Rows,
    frozen: _Frozen | None,
) -> torch.Tensor:
    """Each request's keys: one per context template, then the bare prompt's: (B, T + 1, in).

    With `frozen` they are already known (the bare prompt is the "{}" template's row); without,
    and for a bare prompt that no template gives, they run on their own, as in the reference
    code."""
    if frozen is None:
        token_lists = [t for p in prepared for t in (*p.contexts, p.bare)]
        positions = [c for p in prepared for c in (*p.context_subject, p.bare_subject)]
        keys = projection_inputs(lm, hp.layer, token_lists, positions)
        return keys.view(len(prepared), -1, keys.shape[-1])
    elsewhere = [r for r, p in enumerate(prepared) if p.bare not in p.contexts]
    bare_keys = iter(
        projection_inputs(
            lm,
            hp.layer,
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


def _compute_batch(
    lm: LoadedModel,
    indexed_requests: Sequence[tuple[int, EditRequest]],
    hp: RomeHparams,
    solver: _KeySolver,
    templates: Sequence[str],
) -> list[EditResult]:
    results: dict[int, EditResult] = {}
    prepared: list[_Prepared] = []
    for index, request in indexed_requests:
        try:
            prepared.append(_prepare(lm, index, request, templates, hp))
        except EditRequestError as error:
            results[index] = EditResult(index, request, error=error)
    if hp.reject_already_predicted:
        kept = []
        for p, predicted in zip(prepared, _already_predicted(lm, prepared), strict=True):
            if predicted:
                request_id = p.request.id if p.request.id is not None else p.index
                reason = f"target_new {p.request.target_new!r} is already the greedy answer"
                error = EditRequestError(p.index, request_id, reason)
                results[p.index] = EditResult(p.index, p.request, error=error)
            else:
                kept.append(p)
        prepared = kept

    if prepared:
        n_templates = len(templates)
        rows = _Rows.build(prepared, hp.v_whole_rows)
        frozen = None if hp.v_whole_rows else _Frozen.compute(lm, rows, hp.layer % lm.n_layers)
        keys = _keys(lm, hp, prepared, rows, frozen).double()  # (requests, templates + 1, in)
        mean_keys = keys[:, :n_templates].mean(dim=1)  # k̄
        ref_keys = mean_keys if hp.consistent_keys else keys[:, n_templates]

        projection = lm.module("mlp_out", hp.layer)
        weight = lm.mlp_out_weight(hp.layer).detach().double()
        linear = ref_keys @ weight.T  # W k_ref
        bias = getattr(projection, "bias", None)
        reference_outputs = linear if bias is None else linear + bias.detach().double()

        deltas, nlls, steps = _optimise_values(lm, rows, frozen, reference_outputs.float(), hp)
        values = linear + deltas.double()  # v* = W k_ref + δ
        u = solver(mean_keys)
        alignment = (u * ref_keys).sum(-1, keepdim=True)  # uᵀk_ref: small means a huge ΔW
        lefts = (values - linear) / alignment
        for row, p in enumerate(prepared):
            update = RankOneUpdate(
                hp.layer % lm.n_layers,
                lefts[row].to(lm.dtype),
                u[row].to(lm.dtype),
            )
            results[p.index] = EditResult(
                p.index,
                p.request,
                update=update,
                key=ref_keys[row].float(),
                value=values[row].float(),
                target_nll=nlls[row],
                steps=steps[row],
                info={
                    "delta_norm": float(deltas[row].norm()),
                    "update_norm": float(lefts[row].norm()),  # ‖ΔW‖ (u has unit norm)
                    "alignment": float(alignment[row] / ref_keys[row].norm()),
                    "templates": n_templates,
                },
            )
    return [results[index] for index, _ in indexed_requests]


def _setup(lm, hparams, second_moment, context_templates) -> tuple[list[str], _KeySolver]:
    layer, loss_layer = lm.path("mlp_out", hparams.layer), hparams.v_loss_layer % lm.n_layers
    if loss_layer < hparams.layer % lm.n_layers:
        raise ValueError(
            f"v_loss_layer {hparams.v_loss_layer} reads the model below the edited layer "
            f"({layer}), where δ cannot change the loss"
        )
    templates = list(context_templates) if context_templates else templates_for(lm, hparams)
    return templates, _KeySolver(second_moment, hparams, lm.device)


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
    templates, solver = _setup(lm, hparams, second_moment, context_templates)
    indexed = [(first_index + i, r) for i, r in enumerate(requests)]
    results = []
    for start in range(0, len(indexed), batch_size):
        results += _compute_batch(
            lm, indexed[start : start + batch_size], hparams, solver, templates
        )
    return results


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
    """Apply edits one after another, each computed on the already-edited model (in place).

    Wrap the call in `preserved_weights(lm, [hparams.layer])` to get the original model back.
    `on_checkpoint(n_done, results)` runs after every `checkpoint_every` requests and at the end.
    """
    templates, solver = _setup(lm, hparams, second_moment, context_templates)
    results: list[EditResult] = []
    for index, request in enumerate(requests):
        (result,) = _compute_batch(lm, [(index, request)], hparams, solver, templates)
        if result.update is not None:
            apply_update(lm, result.update)
        results.append(result)
        done = index + 1
        if on_checkpoint and checkpoint_every and (done % checkpoint_every == 0):
            on_checkpoint(done, results)
    if on_checkpoint and checkpoint_every and len(requests) % checkpoint_every:
        on_checkpoint(len(requests), results)
    return results


# --------------------------------------------------------------------------------------------
# Applying updates: to the weights (exactly restorable) or per example through a hook


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


__all__ = [
    "EditRequest",
    "EditRequestError",
    "EditResult",
    "PerExampleEdits",
    "RankOneUpdate",
    "RomeHparams",
    "apply_update",
    "compute_update",
    "compute_updates",
    "edit_sequentially",
    "edited",
    "generate_context_templates",
    "preserved_weights",
    "projection_inputs",
    "templates_for",
]
