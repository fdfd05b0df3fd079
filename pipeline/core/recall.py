"""Which facts does a model know? One teacher-forced forward pass per fact.

The greedy continuation matches the attribute over all of its tokens exactly when, at every
answer position, the argmax of the logits is the next attribute token (given the attribute
so far). So a single forward pass over prompt + attribute decides it, instead of a generation
loop, and the answer's probabilities come from the same pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from pipeline.core.models import LoadedModel
from pipeline.core.tokens import encode, right_pad, target_ids
from pipeline.data.records import KnownFact


@dataclass(frozen=True)
class Recall:
    """What the model does with one fact's prompt."""

    fact: KnownFact
    answer_ids: tuple[int, ...]
    predicted_ids: tuple[int, ...]  # argmax at each answer position (teacher-forced)
    first_token_prob: float  # P(first answer token | prompt)
    answer_prob: float  # exp(mean log P) over all answer tokens

    @property
    def known(self) -> bool:
        return self.predicted_ids == self.answer_ids

    @property
    def first_token_known(self) -> bool:
        return self.predicted_ids[0] == self.answer_ids[0]


def too_long(lm: LoadedModel, fact: KnownFact) -> tuple[str, str] | None:
    """(field, why) if the fact's prompt and attribute do not fit the model's context (they
    would fail deep in the model with nothing named); None if they fit."""
    size = len(encode(lm.tokenizer, fact.prompt)) + len(
        target_ids(lm.tokenizer, fact.attribute, fact.prompt)
    )
    if size > lm.context_length:
        return "prompt", (
            f"{size} tokens with its attribute, more than the model's context of "
            f"{lm.context_length}"
        )
    return None


@torch.no_grad()
def check_known(
    lm: LoadedModel, facts: Sequence[KnownFact], *, batch_size: int = 16, progress: bool = True
) -> list[Recall]:
    tokenizer = lm.tokenizer
    prompts = [encode(tokenizer, fact.prompt) for fact in facts]
    answers = [target_ids(tokenizer, fact.attribute, fact.prompt) for fact in facts]
    recalls: list[Recall] = []
    bar = tqdm(total=len(facts), desc="known facts", unit="fact", disable=not progress)
    for start in range(0, len(facts), batch_size):
        rows = range(start, min(start + batch_size, len(facts)))
        ids, mask = right_pad(
            [prompts[i] + answers[i] for i in rows], tokenizer.pad_token_id, lm.device
        )
        # Unembed only the answer positions: the vocabulary projection is a fifth of the model.
        hidden = lm.model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
        unembed = lm.module("unembed")
        for row, i in enumerate(rows):
            first = len(prompts[i]) - 1  # the position that predicts the first answer token
            answer = torch.as_tensor(answers[i], device=ids.device)
            logits = unembed(hidden[row, first : first + len(answers[i])])
            step_log_probs = torch.log_softmax(logits.float(), dim=-1)
            token_log_probs = step_log_probs.gather(1, answer[:, None]).squeeze(1)
            recalls.append(
                Recall(
                    fact=facts[i],
                    answer_ids=tuple(answers[i]),
                    predicted_ids=tuple(step_log_probs.argmax(-1).tolist()),
                    first_token_prob=float(token_log_probs[0].exp()),
                    answer_prob=float(token_log_probs.mean().exp()),
                )
            )
        bar.update(len(rows))
    bar.close()
    return recalls
