"""Context templates: short prefixes the model writes itself, so an edit holds in many contexts.

Keys and values are averaged over "{}" and prefixes such as "The city of X. {}" (Meng et al. 2022,
section 3.1); ROME, MEMIT and their successors all take them from the model being edited.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from pipeline.core.models import LoadedModel
from pipeline.core.tokens import encode


@torch.no_grad()
def generate_context_templates(
    lm: LoadedModel,
    lengths: Sequence[tuple[int, int]] = ((5, 10), (10, 10)),
    *,
    seeds: Sequence[str] = ("The", "Therefore", "Because", "I", "You"),
    top_k: int = 5,
    seed: int = 0,
    length_includes_seed: bool = False,
) -> list[str]:
    """["{}", "<generated text>. {}", ...]: prefixes the model writes itself from seed words.

    Top-k sampling from a seeded generator makes the list reproducible for a model; callers
    cache it per model. Prefix i starts from seed word i modulo the number of seeds. A prefix of
    `length` has `length` generated tokens after its seed word; the reference code counts the
    seed in the length (`length_includes_seed=True`: one token fewer for a one-token seed).
    """
    generator = torch.Generator(device=lm.device).manual_seed(seed)
    templates = ["{}"]
    for length, count in lengths:
        for seed_index, word in enumerate(seeds):
            n = len(range(seed_index, count, len(seeds)))
            if n == 0:
                continue
            ids = torch.tensor([encode(lm.tokenizer, word)] * n, device=lm.device)
            for _ in range(length - ids.shape[1] if length_includes_seed else length):
                logits = lm.model(input_ids=ids).logits[:, -1].float()
                top = logits.topk(top_k, dim=-1)
                pick = torch.multinomial(top.values.softmax(-1), 1, generator=generator)
                ids = torch.cat([ids, top.indices.gather(1, pick)], dim=1)
            for row in ids:
                text = lm.tokenizer.decode(row, skip_special_tokens=True)
                templates.append(text.replace("{", "").replace("}", "") + ". {}")
    return templates


def templates_for(lm: LoadedModel, hparams: Any) -> list[str]:
    """The context templates an editor's hyperparameters ask for (`context_templates` as
    (length, count) pairs, `context_seeds`, `context_top_k`, `context_seed`)."""
    return generate_context_templates(
        lm,
        hparams.context_templates,
        seeds=hparams.context_seeds,
        top_k=hparams.context_top_k,
        seed=hparams.context_seed,
        length_includes_seed=getattr(hparams, "context_length_includes_seed", False),
    )
