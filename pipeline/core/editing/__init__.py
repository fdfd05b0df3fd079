"""Knowledge editing, split by concept so every editor reuses the same parts:

requests    EditRequest / EditResult, validation shared by every editor
templates   context templates the model writes itself
keys        keys at the rewritten projection, the second-moment solve (C⁻¹ k)
prefixes    what the value optimisation computes once (δ cannot change it)
values      the target-value optimisation (ROME's v*, MEMIT's z)
updates     update algebra: apply, restore bit-for-bit, per-example hooks
sequential  edits accumulating in one model, with checkpoints
editor      the interface every editor implements (independent, joint, commit)
rome        ROME and r-ROME on top of them
memit       MEMIT: many facts over a range of layers
emmet       EMMET: MEMIT's frame with equality constraints
alphaedit   AlphaEdit: MEMIT's update in the null space of preserved keys
ft          FT and FT-L, the ROME paper's fine-tuning baselines
kn          KN, knowledge neurons (the ROME paper's baseline)
"""

from pipeline.core.editing.requests import EditRequest, EditRequestError, EditResult
from pipeline.core.editing.templates import generate_context_templates, templates_for
from pipeline.core.editing.updates import (
    DenseUpdate,
    LowRankUpdate,
    PerExampleEdits,
    RankOneUpdate,
    Update,
    Updates,
    apply_update,
    as_list,
    edited,
    preserved_weights,
)

__all__ = [
    "EditRequest",
    "EditRequestError",
    "DenseUpdate",
    "EditResult",
    "LowRankUpdate",
    "PerExampleEdits",
    "RankOneUpdate",
    "Update",
    "Updates",
    "as_list",
    "apply_update",
    "edited",
    "generate_context_templates",
    "preserved_weights",
    "templates_for",
]
