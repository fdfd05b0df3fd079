"""The transformers key/value cache, as the fast paths use it, in one place.

The fast tracer (`patching.fast`) and the v* prefix reuse (`editing.prefixes`) hand a model a
`DynamicCache` and read or build one layer by layer. Three things about it are assumed, and
`tests/test_kvcache.py` fails naming the installed transformers version if any changes:
  - the model's forward takes the cache as `cache` (transformers 5.24; `past_key_values` before
    that, deprecated and to be removed in 5.40), found from the forward's signature;
  - `DynamicCache(pairs)` builds a cache from per-layer (keys, values), each (batch, heads,
    positions, head dim), and `cache.layers[i].keys / .values` read them back;
  - `cache.update(keys, values, layer)` appends positions to a layer.
pyproject.toml bounds transformers below the first minor version these were not tested on.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Sequence

import torch
from transformers import DynamicCache

TESTED = "5.24"  # the transformers minor version the fast paths were verified on


@functools.cache
def _argument(forward_owner: type) -> str:
    parameters = inspect.signature(forward_owner.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def cache_argument(model: torch.nn.Module) -> str:
    """The name under which `model`'s forward takes a cache: `cache`, or `past_key_values` on
    transformers versions before the rename."""
    return _argument(type(model))


def with_cache(model: torch.nn.Module, cache: DynamicCache) -> dict[str, object]:
    """Keyword arguments handing `cache` to `model`'s forward (with use_cache on)."""
    return {cache_argument(model): cache, "use_cache": True}


def from_pairs(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> DynamicCache:
    """A cache holding per-layer (keys, values)."""
    return DynamicCache(list(pairs))


def pairs(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer (keys, values) of a cache."""
    return [(layer.keys, layer.values) for layer in cache.layers]
