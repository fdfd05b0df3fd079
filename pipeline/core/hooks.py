"""Hook helpers every algorithm shares: stop a forward pass early, read or change a module's
output for the length of a block of code.

A forward pass that only needs what some module computes (a key at layer l, block 0's inputs)
raises `StopForward` from a hook there, so the layers above it never run.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch

from pipeline.core.models import LoadedModel


class StopForward(Exception):
    """Raised by a hook once it has what it needs, to skip the rest of the network."""


def run_until_stopped(lm: LoadedModel, ids: torch.Tensor, mask: torch.Tensor, **inputs) -> None:
    """A forward pass that a hook may end early by raising StopForward (`inputs`: more model
    arguments, e.g. position_ids and past_key_values)."""
    with contextlib.suppress(StopForward):
        lm.model(input_ids=ids, attention_mask=mask, **inputs)


def main_output(output):
    """Blocks and attention modules return tuples; the hidden state comes first."""
    return output[0] if isinstance(output, tuple) else output


def output_of(lm: LoadedModel, module: torch.nn.Module, ids, mask, **inputs) -> torch.Tensor:
    """Run the model until `module` has produced its output; return that output."""
    box: list[torch.Tensor] = []

    def grab(mod, args, output):
        box.append(main_output(output))
        raise StopForward

    handle = module.register_forward_hook(grab)
    try:
        run_until_stopped(lm, ids, mask, **inputs)
    finally:
        handle.remove()
    return box[0]


@contextlib.contextmanager
def forward_hooks(pairs: Iterable[tuple[torch.nn.Module, object]]):
    """Register (module, hook) forward hooks for the duration of the block."""
    handles = [module.register_forward_hook(hook) for module, hook in pairs]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
