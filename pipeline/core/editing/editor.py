"""The interface every editor implements, so the protocols (independent, mass, sequential) are
written once for all of them.

An editor is bound to its hyperparameters and statistics; given (index, request) pairs it returns
- `independent`: one result per request, each with its own update, computed on the model as it
  is (the paper's protocol: each case edited alone on the unedited model);
- `joint`: updates that together write every request (MEMIT's mass editing). An editor without a
  joint solve writes the requests one after another, each computed on the model as the ones
  before left it (how ROME writes many facts);
and `commit` tells a stateful editor (AlphaEdit) that a joint edit was applied for good.
Nothing is applied by these methods: the model is as it was when they return.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from tqdm.auto import tqdm

from pipeline.core.editing.requests import EditRequest, EditResult
from pipeline.core.editing.updates import Update, apply_update, as_list, preserved_weights
from pipeline.core.models import LoadedModel

Indexed = Sequence[tuple[int, EditRequest]]


@dataclass
class JointEdit:
    """Updates that write every ok request at once, and each request's outcome. A result's
    `update` is its own share of `updates` where the edit has one (requests written one after
    another), None where the updates belong to the batch as a whole (a joint solve)."""

    updates: list[Update]
    results: list[EditResult]
    info: dict = field(default_factory=dict)


class Editor:
    """Base class: subclasses implement `independent`, and `joint` where they have a joint solve."""

    name = "editor"
    layers: tuple[int, ...] = ()  # the layers whose MLP output projection an edit may change
    # False: `joint` writes the requests one after another (the base class's), so a joint edit
    # of N requests passes through the joint edit of each first n; True: one solve for all.
    joint_solve = False

    def independent(self, lm: LoadedModel, requests: Indexed) -> list[EditResult]:
        raise NotImplementedError

    def joint(self, lm: LoadedModel, requests: Indexed) -> JointEdit:
        """Request after request, each computed on the model as edited by those before."""
        updates: list[Update] = []
        results: list[EditResult] = []
        many = tqdm(requests, desc=f"{self.name}: one after another", disable=len(requests) < 10)
        with preserved_weights(lm, self.layers):
            for pair in many:
                (result,) = self.independent(lm, [pair])
                apply_update(lm, result.update)
                updates += as_list(result.update)
                results.append(result)
        return JointEdit(updates, results)

    def commit(self, lm: LoadedModel, edit: JointEdit) -> None:
        """Called after `edit` has been applied to the model for good (sequential editing)."""

    def state_dict(self) -> dict:
        """What `commit` has accumulated (none here), to resume sequential editing from."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Back to a `state_dict` (with the weights of that moment put back by the caller)."""
