"""Sequential editing: edits accumulate in one model, each computed on the model as already
edited (the setting of Gupta et al. 2024 and AlphaEdit), with checkpoints along the way.

Editor-agnostic: an editor hands over a function that computes the results of a batch of
requests on the model as it is now; this module applies them in place, batch after batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from pipeline.core.editing.requests import EditRequest, EditResult
from pipeline.core.editing.updates import apply_update
from pipeline.core.models import LoadedModel

ComputeBatch = Callable[[Sequence[tuple[int, EditRequest]]], list[EditResult]]


def edit_sequentially(
    lm: LoadedModel,
    requests: Sequence[EditRequest],
    compute_batch: ComputeBatch,
    *,
    batch_size: int = 1,
    checkpoint_every: int = 0,
    on_checkpoint: Callable[[int, list[EditResult]], None] | None = None,
) -> list[EditResult]:
    """Apply `batch_size` edits at a time, each batch computed on the already-edited model.

    Wrap the call in `preserved_weights` to get the original model back. `on_checkpoint(n_done,
    results)` runs whenever the edits done pass a multiple of `checkpoint_every`, and at the end.
    """
    results: list[EditResult] = []
    indexed = list(enumerate(requests))
    for start in range(0, len(indexed), batch_size):
        batch = compute_batch(indexed[start : start + batch_size])
        for result in batch:
            if result.update is not None:
                apply_update(lm, result.update)
        results += batch
        done = len(results)
        if (
            on_checkpoint
            and checkpoint_every
            and done // checkpoint_every > start // checkpoint_every
        ):
            on_checkpoint(done, results)
    if on_checkpoint and checkpoint_every and len(requests) % checkpoint_every:
        on_checkpoint(len(requests), results)
    return results
