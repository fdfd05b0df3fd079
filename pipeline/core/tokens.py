"""Token utilities: where the subject sits in a prompt, how a target tokenizes, batching.

Spans come from character offsets, never from re-tokenizing the subject alone: a subject
tokenizes differently inside a sentence (leading space, merges with neighbours), and some
tokenizers prepend a BOS token.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

import torch


class SubjectNotFoundError(ValueError):
    pass


def fill(template: str, subject: str) -> str:
    """Put the subject into a "{}" template (other braces are left alone)."""
    if "{}" not in template:
        raise ValueError(f"template has no '{{}}' placeholder: {template!r}")
    return template.replace("{}", subject)


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of `text` as the model sees a prompt (with BOS if the tokenizer adds one)."""
    return tokenizer(text)["input_ids"]


def subject_span(tokenizer: Any, prompt: str, subject: str) -> tuple[int, int]:
    """Token indices [start, end) of the subject's last occurrence in `prompt`.

    The prompt is the text before the answer, so its last occurrence is the one nearest the
    answer. A token belongs to the subject if its characters overlap the subject's characters
    (a leading-space token such as "ĠParis" overlaps "Paris").
    """
    char_start = prompt.rfind(subject) if subject else -1
    if char_start < 0:
        raise SubjectNotFoundError(f"subject {subject!r} not found in prompt {prompt!r}")
    char_end = char_start + len(subject)
    offsets = tokenizer(prompt, return_offsets_mapping=True)["offset_mapping"]
    inside = [
        i
        for i, (a, b) in enumerate(offsets)
        if b > a and a < char_end and b > char_start  # zero-width tokens (BOS) never overlap
    ]
    if not inside:
        raise SubjectNotFoundError(f"subject {subject!r} covers no token of {prompt!r}")
    return inside[0], inside[-1] + 1


def answer_text(target: str) -> str:
    """A target as it follows a prompt: one leading space, as in CounterFact's " Paris"."""
    return " " + target.strip()


def target_ids(tokenizer: Any, target: str, prompt: str | None = None) -> list[int]:
    """Token ids of the target following the prompt (with its leading space).

    With a prompt, the target is tokenized in context (prompt + target) and the prompt's tokens
    are cut off, which is right for tokenizers whose merges depend on what precedes (SentencePiece
    adds a "▁" to a bare word); it falls back to the bare target when the prompt's tokens do not
    form a prefix of the joint tokenization.
    """
    text = answer_text(target)
    if not target.strip():
        raise ValueError("target is empty")
    if prompt is not None:
        prefix = encode(tokenizer, prompt)
        joint = encode(tokenizer, prompt + text)
        if joint[: len(prefix)] == prefix and len(joint) > len(prefix):
            return joint[len(prefix) :]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"target {target!r} tokenizes to nothing")
    return ids


def right_pad(
    sequences: Sequence[Sequence[int]], pad_id: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack token lists into (ids, attention_mask), padded on the right.

    Right padding keeps every real token at its own position, so a causal model gives each row
    the result it gives alone.
    """
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    return ids.to(device), mask.to(device)


def tokenizer_identity(tokenizer: Any) -> str:
    """A digest of how the tokenizer turns text into ids (its serialized vocabulary, merges and
    normalizers where it has a fast backend, else its vocabulary and special tokens), computed
    once per tokenizer object. Caches of numbers computed from tokenized text are keyed by it.
    The backend's padding and truncation state is left out: calls change it, texts do not."""
    cached = getattr(tokenizer, "_pipeline_identity", None)
    if cached:
        return cached
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        state = json.loads(backend.to_str())
        state.pop("padding", None), state.pop("truncation", None)
        described = json.dumps(state, sort_keys=True, ensure_ascii=False)
    else:
        described = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
    special = json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str)
    identity = hashlib.sha256((described + special).encode()).hexdigest()[:16]
    tokenizer._pipeline_identity = identity
    return identity
