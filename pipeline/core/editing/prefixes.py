"""What the value optimisation computes once: everything the optimised δ cannot change.

δ is added at one token (the subject's last) of one layer. Under causal attention nothing before
that token depends on δ, and nothing below that layer does either, so before the first step:

- `Prefixes`: each row's tokens before the subject's last run once, keeping their keys and values
  at every layer (a context template's text, shared by the rows of every request, runs once per
  batch); each step then runs only the ~3 tokens after, attending to them.
- `Frozen`: those remaining tokens run once up to the edited layer, keeping that block's input;
  at each step the blocks below replay it (`replaying`) instead of running. The keys are read in
  the same pass.

All of it is exact: the same numbers as running whole rows at every step, up to float rounding.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from pipeline.core import kvcache
from pipeline.core.editing.rows import Rows
from pipeline.core.hooks import StopForward, output_of, run_until_stopped
from pipeline.core.models import LoadedModel
from pipeline.core.tokens import right_pad


def _shared_start(token_lists: Sequence[Sequence[int]]) -> list[int]:
    """The longest list of tokens that every one of token_lists starts with."""
    first = token_lists[0]
    length = min(len(tokens) for tokens in token_lists)
    for tokens in token_lists[1:]:
        length = next((i for i in range(length) if tokens[i] != first[i]), length)
    return list(first[:length])


@dataclass
class Prefixes:
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
    def compute(cls, lm: LoadedModel, rows: Rows) -> Prefixes | None:
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
        past: Prefixes | None = None,
        past_rows: Sequence[int] | None = None,
    ) -> Prefixes | None:
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
            ids, mask, inputs = _inputs_after(lm, before, ids, torch.ones_like(ids))
            output_of(lm, lm.module("block", -1), ids, mask, **inputs)
            layers = kvcache.pairs(inputs[kvcache.cache_argument(lm.model)])
            if not new:
                new = [
                    tuple(t.new_zeros(len(token_lists), t.shape[1], width, t.shape[3]) for t in kv)
                    for kv in layers
                ]
            rows = torch.as_tensor(members, device=device)
            for (keys, values), (layer_keys, layer_values) in zip(new, layers, strict=True):
                keys[rows, :, :length] = layer_keys[:, :, -length:]
                values[rows, :, :length] = layer_values[:, :, -length:]
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
        cache = kvcache.from_pairs(
            [(k[rows, :, :width], v[rows, :, :width]) for k, v in self.key_values]
        )
        return cache, self.mask[rows, :width], self.lengths[rows]


def _inputs_after(
    lm: LoadedModel,
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
    inputs = {**kvcache.with_cache(lm.model, cache), "position_ids": positions}
    return ids, torch.cat([past_mask, mask], dim=1), inputs


@dataclass
class Frozen:
    """What δ cannot change, computed once before v* is optimised: the prefixes' keys and values;
    for every token from the subject's last on, the input of the edited layer's block (δ enters
    in that block, so the blocks below it see the same at every step and then replay it instead
    of running); and each row's key (the projection's input at its subject, δ = 0)."""

    layer: int
    prefixes: Prefixes | None
    block_inputs: torch.Tensor | None  # (rows, longest suffix, d); None if the layer is 0
    block_output: Callable[[torch.Tensor], object]  # a block input as a block's output looks
    keys: torch.Tensor  # (rows, in)

    @classmethod
    @torch.no_grad()
    def compute(cls, lm: LoadedModel, rows: Rows, layer: int) -> Frozen:
        prefixes = Prefixes.compute(lm, rows)
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
                ids, mask, inputs = suffix_inputs(lm, rows, prefixes, members)
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
def replaying(blocks: Sequence[torch.nn.Module], output: object) -> Iterator[None]:
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


def suffix_inputs(
    lm: LoadedModel, rows: Rows, prefixes: Prefixes | None, members: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Model inputs for the given rows' tokens after their split, right-padded, after their
    prefixes."""
    suffixes = [rows.tokens[r][rows.split[r] :] for r in members]
    ids, mask = right_pad(suffixes, lm.tokenizer.pad_token_id or 0, lm.device)
    if prefixes is None:  # whole rows
        return ids, mask, {"position_ids": torch.arange(ids.shape[1], device=lm.device)[None]}
    before = prefixes.select(torch.as_tensor(members, device=lm.device))
    return _inputs_after(lm, before, ids, mask)
