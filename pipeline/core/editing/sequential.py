"""Sequential editing: edits accumulate in one model, each batch computed on the model as the
batches before left it (the setting of Gupta et al. 2024 and AlphaEdit), with checkpoints.

Editor-agnostic: each batch is the editor's `joint` edit, applied in place and then committed
(AlphaEdit remembers the keys it must preserve from then on).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from pipeline.core.editing.editor import Editor
from pipeline.core.editing.requests import EditRequest, EditResult, refuse_contradictions
from pipeline.core.editing.updates import apply_update
from pipeline.core.models import LoadedModel


def edit_sequentially(
    lm: LoadedModel,
    requests: Sequence[EditRequest],
    editor: Editor,
    *,
    batch_size: int = 1,
    checkpoint_every: int = 0,
    on_checkpoint: Callable[[int, list[EditResult]], None] | None = None,
) -> list[EditResult]:
    """Write `batch_size` requests at a time into the model, in place.

    Wrap the call in `preserved_weights(lm, editor.layers)` to get the original model back.
    `on_checkpoint(n_done, results)` runs whenever the edits done pass a multiple of
    `checkpoint_every`, and at the end. Contradictory requests within one batch are refused
    before any edit (`refuse_contradictions`).
    """
    results: list[EditResult] = []
    indexed = list(enumerate(requests))
    for start in range(0, len(requests), batch_size):
        refuse_contradictions(requests[start : start + batch_size])
    for start in range(0, len(indexed), batch_size):
        edit = editor.joint(lm, indexed[start : start + batch_size])
        apply_update(lm, edit.updates)
        editor.commit(lm, edit)
        results += edit.results
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
