"""The fast engine: the reference's numbers with a fraction of the compute.

All savings are exact (they skip work whose result is known, never approximate it):

1. The clean run and the corrupted run (S noisy copies) happen once. They cache, per layer, the
   block inputs, the MLP and attention outputs and the attention keys/values.
2. A restored run equals the corrupted run below the first patched layer, so it starts there,
   from the cached corrupted state (hidden: block l's output with token t set to its clean value).
3. With causal attention, positions before t are the same as in the corrupted run at every layer,
   so only positions t.. are computed; they attend to the cached corrupted keys/values of 0..t-1.
4. Positions before the subject are untouched by the noise: restoring them changes nothing, so
   those grid cells are the corrupted probability, with no compute.
5. Many restorations run as rows of one batch: for a token t, all (layer, copy) rows go up the
   stack together, each row joining at its own first layer (rows are sorted by it).
6. The final norm and the unembedding run only at the read-out positions.
7. Window kinds (mlp, attn): at the first patched layer only token t differs from the corrupted
   run, so that layer runs on token t alone; the other positions take their cached values.
8. Windows clipped at the bottom (all starting at layer 0) patch the same layers up to the top of
   the smaller window, so a row continues from its neighbour's state there instead of
   recomputing the layers below.

The engine calls the model's own block modules. How a model calls its blocks (attention mask,
rotary embeddings, position ids, where its cache goes) is captured from the model itself: a
forward pass is run with a transformers cache holding t positions and stopped by a pre-hook on
block 0, which records the arguments. Our calls pass the same arguments with the cache swapped for
`_KVCache`, which feeds the cached keys/values of positions 0..t-1. So no architecture is named
here; whatever runs before block 0 (GPT-2's learned position embeddings) is never re-applied.
"""

from __future__ import annotations

import bisect
import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from pipeline.core.hooks import StopForward, forward_hooks, main_output
from pipeline.core.kvcache import with_cache
from pipeline.core.models import LoadedModel
from pipeline.core.patching.common import (
    KINDS,
    SEVERED,
    Readout,
    answer_prob,
    corrupt_embeddings,
    window_layers,
)


class _KVCache:
    """Stands in for a transformers cache in one block call.

    Attention modules hand `update` the keys/values of the positions being computed and attend to
    what it returns: the fixed keys/values of the earlier positions, then the new ones.
    """

    def __init__(self, layer: int, prefix: tuple[torch.Tensor, torch.Tensor] | None = None):
        self.layer, self.prefix, self.new = layer, prefix, None

    def update(self, key, value, layer_idx, *args, **kwargs):
        if layer_idx != self.layer:
            raise RuntimeError(f"cache for layer {self.layer} updated by layer {layer_idx}")
        self.new = (key, value)
        if self.prefix is not None:
            key = torch.cat([self.prefix[0], key], dim=-2)
            value = torch.cat([self.prefix[1], value], dim=-2)
        return key, value


@dataclass
class _BlockCall:
    """The arguments the model passes its blocks for a given split of cached/new positions."""

    args: tuple
    kwargs: dict
    placeholder: object  # the cache the model passed; swapped for a _KVCache on each call

    def __call__(self, block: torch.nn.Module, hidden: torch.Tensor, cache: _KVCache):
        def swap(value):
            return cache if value is self.placeholder else value

        kwargs = {name: swap(value) for name, value in self.kwargs.items()}
        return main_output(block(hidden, *map(swap, self.args), **kwargs))


def _capture_block_call(
    lm: LoadedModel, input_ids: torch.Tensor, past: DynamicCache
) -> tuple[torch.Tensor, _BlockCall]:
    """Block 0's input hidden state and call arguments, from a forward pass stopped there."""
    seen = {}

    def grab(module, args, kwargs):
        seen["args"], seen["kwargs"] = args, dict(kwargs)
        raise StopForward

    handle = lm.module("block", 0).register_forward_pre_hook(grab, with_kwargs=True)
    try:
        lm.model(input_ids=input_ids, **with_cache(lm.model, past))
    except StopForward:
        pass
    finally:
        handle.remove()
    if not seen:
        raise RuntimeError("the model's forward pass never reached block 0")
    args, kwargs = seen["args"], seen["kwargs"]
    if args:
        hidden, args = args[0], args[1:]
    else:
        hidden = kwargs.pop("hidden_states")
    if not any(value is past for value in (*args, *kwargs.values())):
        raise RuntimeError(
            f"{type(lm.model).__name__} does not hand its cache to its blocks; "
            "the fast engine needs that to reuse keys/values (use engine='reference')"
        )
    return hidden, _BlockCall(args, kwargs, past)


def _record_into(store: dict, key: int):
    def hook(module, inputs, output):
        store[key] = main_output(output).clone()

    return hook


def _overwrite_first_position(rows: torch.Tensor | None, values: torch.Tensor):
    """A hook setting the module output at the first computed position (token t)."""

    def hook(module, inputs, output):
        hidden = main_output(output)
        if rows is None:
            hidden[:, 0] = values
        else:
            hidden[rows, 0] = values
        return output

    return hook


@dataclass
class _Plan:
    """Restored runs at one token, one batch row each, ordered by (join, first_only).

    A row starts at layer `join` from `init` (its state entering that layer, positions token..),
    or from the state of another row entering that layer (`forks`: layer -> [(row, source)]),
    when their patches agreed up to there. A `first_only` row changes only the restored position
    at its first layer (the other positions keep their corrupted block outputs), so that layer
    runs on one position. `patch(layer, rows)` gives the (module, hook) pairs for those rows.
    """

    join: list[int]
    first_only: list[bool]
    init: torch.Tensor
    copy: torch.Tensor
    forks: dict[int, list[tuple[int, int]]]
    patch: Callable | None


class FastTracer:
    """The cached clean and corrupted runs of one prompt, and restorations computed from them.

    `batch_size` bounds the rows (restored runs) per block call; it is rounded to whole noise
    copies (a multiple of the layer count), since rows of one copy may share states.
    """

    @torch.no_grad()
    def __init__(
        self,
        lm: LoadedModel,
        readout: Readout,
        span: tuple[int, int],
        noise: torch.Tensor,
        batch_size: int = 512,
    ):
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.lm, self.readout, self.span, self.batch_size = lm, readout, span, batch_size
        self.n_layers, self.copies = lm.n_layers, noise.shape[0]
        self.blocks = [lm.module("block", j) for j in range(self.n_layers)]
        self.sequence = torch.tensor(readout.sequence, device=lm.device)
        self._calls: dict[tuple[int, int], _BlockCall] = {}

        clean = self._full_run(self.sequence[None], None)
        corrupt = self._full_run(self.sequence[None].expand(self.copies, -1), noise)
        self.clean, self.corrupted = clean["probs"][0].item(), corrupt["probs"].mean().item()
        self.clean_states = clean["states"]  # (L+1, 1, T, H): input of block j, then the output
        self.corrupt_states = corrupt["states"]  # (L+1, S, T, H)
        self.clean_outputs, self.corrupt_outputs = clean["outputs"], corrupt["outputs"]
        self.corrupt_kv = corrupt["kv"]  # per layer (keys, values), (S, heads, T, head dim)

    def _full_run(self, input_ids: torch.Tensor, noise: torch.Tensor | None) -> dict:
        past = DynamicCache(config=self.lm.model.config)
        noising = corrupt_embeddings(self.lm, self.span, noise, 0) if noise is not None else None
        with noising or contextlib.nullcontext():
            hidden, call = _capture_block_call(self.lm, input_ids, past)
        states, kv, outputs = [hidden], [], {"mlp": {}, "attn": {}}
        recorders = [
            (self.lm.module(kind, j), _record_into(outputs[kind], j))
            for kind in outputs
            for j in range(self.n_layers)
        ]
        with forward_hooks(recorders):
            for j, block in enumerate(self.blocks):
                cache = _KVCache(j)
                hidden = call(block, hidden, cache)
                states.append(hidden)
                kv.append(cache.new)
        return {
            "probs": self._probs(hidden[:, list(self.readout.positions)]),
            "states": torch.stack(states),
            "kv": kv,
            "outputs": {
                kind: torch.stack([out[j] for j in range(self.n_layers)])
                for kind, out in outputs.items()
            },
        }

    def _probs(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm.logits(hidden)
        return answer_prob(logits, self.readout.targets).cpu()

    def _call_for(self, token: int, length: int) -> _BlockCall:
        """The block arguments for computing `length` positions after `token` cached ones."""
        if (token, length) not in self._calls:
            past = DynamicCache(config=self.lm.model.config)
            if token:
                for j, (keys, values) in enumerate(self.corrupt_kv):
                    past.update(keys[:1, :, :token], values[:1, :, :token], j)
            ids = self.sequence[None, token : token + length]
            _, self._calls[token, length] = _capture_block_call(self.lm, ids, past)
        return self._calls[token, length]

    def _block(self, layer: int, token: int, hidden: torch.Tensor, plan: _Plan, rows: slice):
        """Block `layer` on `hidden` (rows `rows` of the plan, positions token..)."""
        keys, values = self.corrupt_kv[layer]
        copy = plan.copy[rows]
        prefix = (keys[copy, :, :token], values[copy, :, :token]) if token else None
        call = self._call_for(token, hidden.shape[1])
        with forward_hooks(plan.patch(layer, rows) if plan.patch else []):
            return call(self.blocks[layer], hidden, _KVCache(layer, prefix))

    def _run(self, token: int, plan: _Plan) -> torch.Tensor:
        """Run the plan's rows up the stack over positions token..; P(answer) per row."""
        order = list(zip(plan.join, plan.first_only, strict=True))
        hidden = plan.init
        for layer in range(plan.join[0], self.n_layers):
            for row, source in plan.forks.get(layer, []):
                hidden[row] = hidden[source]
            full = bisect.bisect_left(order, (layer, True))  # rows computing all positions
            active = bisect.bisect_right(order, (layer, True))
            if full:
                rows = slice(0, full)
                hidden[rows] = self._block(layer, token, hidden[rows], plan, rows)
            if active > full:  # first layer of first_only rows: only the restored position
                rows = slice(full, active)
                hidden[rows, :1] = self._block(layer, token, hidden[rows, :1], plan, rows)
                hidden[rows, 1:] = self.corrupt_states[layer + 1][plan.copy[rows], token + 1 :]
        for row, source in plan.forks.get(self.n_layers, []):
            hidden[row] = hidden[source]
        return self._probs(hidden[:, [p - token for p in self.readout.positions]])

    def _plan(self, kind, token, window, sever, copies) -> tuple[_Plan, list[int]]:
        """Rows restoring `kind` at `token` for every layer and the given copies.

        Returns the plan and, for each plan row, its index in (layer, copy) order.
        """
        L, device = self.n_layers, self.lm.device
        rows = []  # (join, first_only, layer, copy, fork source layer or None)
        for layer in range(L):
            fork = None
            if kind == "hidden":
                join, first_only = layer + 1, False
            else:
                here = window_layers(layer, window, L)
                join, first_only = here.start, True
                below = window_layers(layer - 1, window, L) if layer else None
                if below is not None and below.start == here.start:
                    # Same patches as the window below up to its top: continue from its state.
                    join, first_only, fork = below.stop, False, layer - 1
            rows += [(join, first_only, layer, copy, fork) for copy in copies]
        order = sorted(range(len(rows)), key=lambda i: rows[i][:2])
        rows = [rows[i] for i in order]
        position = {(layer, copy): r for r, (_, _, layer, copy, _) in enumerate(rows)}
        forks: dict[int, list[tuple[int, int]]] = {}
        for r, (join, _, _, copy, fork) in enumerate(rows):
            if fork is not None:
                forks.setdefault(join, []).append((r, position[fork, copy]))
        join = torch.tensor([row[0] for row in rows], device=device)
        copy = torch.tensor([row[3] for row in rows], device=device)
        init = self.corrupt_states[join, copy, token:].clone()
        patch = None
        if kind == "hidden":
            init[:, 0] = self.clean_states[join, 0, token]
            if sever is not None:
                patch = self._freeze_patch(sever, token, copy)
        else:
            stop = torch.tensor([window_layers(row[2], window, L).stop for row in rows])
            patch = self._window_patch(kind, token, stop.to(device))
        plan = _Plan([row[0] for row in rows], [row[1] for row in rows], init, copy, forks, patch)
        return plan, order

    def _restore(self, kind: str, token: int, window: int = 10, sever: str | None = None):
        """P(answer) per layer (mean over copies) when `kind` is restored at `token`."""
        L, S = self.n_layers, self.copies
        probs = torch.empty(L, S)
        per_batch = max(1, self.batch_size // L)  # whole copies, so forks stay in their batch
        for first in range(0, S, per_batch):
            copies = range(first, min(S, first + per_batch))
            plan, order = self._plan(kind, token, window, sever, copies)
            batch = torch.empty(len(order))
            batch[order] = self._run(token, plan)
            probs[:, first : first + len(copies)] = batch.view(L, len(copies))
        return probs.mean(1)

    def _window_patch(self, kind, token, stop):
        def patch(layer, rows):
            covered = stop[rows] > layer  # rows whose window still includes this layer
            clean = self.clean_outputs[kind][layer, 0, token]
            return [(self.lm.module(kind, layer), _overwrite_first_position(covered, clean))]

        return patch

    def _freeze_patch(self, kind, token, copy):
        def patch(layer, rows):  # every running row restored a layer below this one
            corrupted = self.corrupt_outputs[kind][layer, copy[rows], token]
            return [(self.lm.module(kind, layer), _overwrite_first_position(None, corrupted))]

        return patch

    @torch.no_grad()
    def grid(self, kind: str, window: int = 10) -> torch.Tensor:
        """(prompt tokens, layers) restored P(answer); tokens before the subject cost nothing."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got '{kind}'")
        grid = torch.full((self.readout.n_prompt, self.n_layers), self.corrupted)
        for token in range(self.span[0], self.readout.n_prompt):
            grid[token] = self._restore(kind, token, window)
        return grid

    @torch.no_grad()
    def severed(self) -> dict[str, torch.Tensor]:
        """Hidden restoration at the last subject token with later MLP / attn outputs frozen."""
        token = self.span[1] - 1
        return {
            name: self._restore("hidden", token, sever=None if name == "none" else name)
            for name in SEVERED
        }
