"""Edit requests and results, and the checks every editor makes before it edits.

A request names a fact by a prompt template with "{}" for the subject and the new object it should
continue with. `prepare` turns it into token ids (the target, the prompt in every context template,
the KL prompts) or an `EditRequestError` that says which request failed and why; every editor
goes through it, so they refuse the same malformed requests with the same error.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from pipeline.core.editing.updates import Updates
from pipeline.core.hooks import output_of
from pipeline.core.models import LoadedModel
from pipeline.core.tokens import (
    SubjectNotFoundError,
    encode,
    fill,
    right_pad,
    subject_span,
    target_ids,
)


@dataclass(frozen=True)
class EditRequest:
    """Rewrite `prompt` (a "{}" template for the subject) to continue with `target_new`."""

    prompt: str
    subject: str
    target_new: str
    target_true: str | None = None
    id: str | int | None = None

    @classmethod
    def from_filled(cls, prompt: str, subject: str, target_new: str, **extra) -> EditRequest:
        """From a prompt with the subject written in (CounterFact/EasyEdit records): the
        subject's last occurrence becomes the "{}"."""
        at = prompt.rfind(subject) if subject else -1
        if at < 0:
            raise SubjectNotFoundError(f"subject {subject!r} not found in prompt {prompt!r}")
        template = prompt[:at] + "{}" + prompt[at + len(subject) :]
        return cls(template, subject, target_new, **extra)

    @property
    def filled(self) -> str:
        return fill(self.prompt, self.subject)


class ContradictoryRequests(ValueError):
    """Requests written in one edit that ask one prompt for two different targets."""


def contradictions(requests: Sequence[EditRequest]) -> list[tuple[EditRequest, EditRequest]]:
    """(first, later) for every request that fills a prompt an earlier request filled (the
    same prompt and subject) with another target."""
    first: dict[str, EditRequest] = {}
    found = []
    for request in requests:
        seen = first.setdefault(request.filled.strip(), request)
        if seen.target_new.strip() != request.target_new.strip():
            found.append((seen, request))
    return found


def refuse_contradictions(requests: Sequence[EditRequest]) -> None:
    """Raise `ContradictoryRequests` naming every pair of `requests` (meant to be written in
    one edit: a mass edit, a sequential batch, joint fine-tuning) that fill the same prompt
    with the same subject and want different targets. One edit cannot make both true, and
    either one scored as a success would hide that the other failed."""
    pairs = [
        f"{seen.id!r} and {request.id!r} ({request.filled!r}: "
        f"{seen.target_new!r} vs {request.target_new!r})"
        for seen, request in contradictions(requests)
    ]
    if pairs:
        raise ContradictoryRequests(
            f"{len(pairs)} pair(s) of requests to be written in one edit contradict each other "
            "(one subject and prompt, two targets): " + "; ".join(pairs[:10])
        )


class EditRequestError(ValueError):
    """A request that cannot be edited; carries which one and why."""

    def __init__(self, index: int, request_id: object, reason: str):
        self.index, self.request_id, self.reason = index, request_id, reason
        super().__init__(f"edit request {index} (id={request_id}): {reason}")


@dataclass
class EditResult:
    """One request's outcome: an update, or the error that rejected it."""

    index: int
    request: EditRequest
    update: Updates = None  # one update, or a list (an edit of several layers)
    error: EditRequestError | None = None
    key: torch.Tensor | None = None  # k_ref: the key the update maps exactly onto `value`
    value: torch.Tensor | None = None  # v* = W k_ref + δ (the projection's linear part)
    target_nll: float = float("nan")  # mean NLL per target token when optimisation stopped
    steps: int = 0  # optimiser steps taken
    info: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.error is None


def update_of(result: EditResult | None) -> Updates:
    """The update to apply for a result: None for no edit (no editor, or a refused request)."""
    return result.update if result is not None and result.ok else None


@dataclass
class PreparedRequest:
    """A request as token ids: its target, its prompt in every context template and the KL
    prompts (with the position of the subject's last token in each), and the bare prompt."""

    index: int
    request: EditRequest
    target: list[int]  # target token ids (in the context of the bare prompt)
    contexts: list[list[int]]  # (context + prompt) token ids, one per template
    context_subject: list[int]  # position of the subject's last token in each
    kl: list[list[int]]  # KL prompt token ids
    kl_subject: list[int]
    bare: list[int]  # the bare prompt's token ids
    bare_subject: int


def prepare(
    lm: LoadedModel,
    index: int,
    request: EditRequest,
    templates: Sequence[str],
    kl_prompts: Sequence[str] = (),
) -> PreparedRequest:
    """The request's token ids, or an `EditRequestError` (raised) saying what is wrong with it."""
    request_id = request.id if request.id is not None else index
    tok = lm.tokenizer

    def fail(reason: str):
        return EditRequestError(index, request_id, reason)

    if "{}" not in request.prompt:
        where = (
            "written in; use EditRequest.from_filled"
            if request.subject in request.prompt
            else "not found"
        )
        raise fail(f"subject {request.subject!r} {where}: prompt {request.prompt!r} has no '{{}}'")
    if not request.subject.strip():
        raise fail("subject is empty")

    def locate(template: str) -> tuple[list[int], int]:
        text = fill(template, request.subject)
        try:
            return encode(tok, text), subject_span(tok, text, request.subject)[1] - 1
        except SubjectNotFoundError as error:
            raise fail(str(error)) from None

    try:
        target = target_ids(tok, request.target_new, request.filled)
    except ValueError as error:
        raise fail(f"target_new {request.target_new!r}: {error}") from None
    if not target:
        raise fail(f"target_new {request.target_new!r} tokenizes to nothing")
    contexts = [locate(t.replace("{}", request.prompt)) for t in templates]
    kls = [locate(p) for p in kl_prompts]
    bare, bare_subject = locate(request.prompt)
    return PreparedRequest(
        index,
        request,
        target,
        [c[0] for c in contexts],
        [c[1] for c in contexts],
        [k[0] for k in kls],
        [k[1] for k in kls],
        bare,
        bare_subject,
    )


@torch.no_grad()
def already_predicted(lm: LoadedModel, prepared: Sequence[PreparedRequest]) -> list[bool]:
    """Whether greedy decoding of each bare prompt already yields the whole target."""
    if not prepared:
        return []
    rows = [p.bare + p.target[:-1] for p in prepared]
    ids, mask = right_pad(rows, lm.tokenizer.pad_token_id or 0, lm.device)
    hidden = output_of(lm, lm.module("block", -1), ids, mask)
    answers = []
    for row, p in enumerate(prepared):
        cols = torch.arange(len(p.bare) - 1, len(p.bare) - 1 + len(p.target), device=lm.device)
        greedy = lm.logits(hidden[row, cols]).float().argmax(-1).tolist()
        answers.append(greedy == p.target)
    return answers


def prepare_all(
    lm: LoadedModel,
    indexed_requests: Sequence[tuple[int, EditRequest]],
    templates: Sequence[str],
    kl_prompts: Sequence[str] = (),
    reject_already_predicted: bool = True,
) -> tuple[list[PreparedRequest], dict[int, EditResult]]:
    """The requests that can be edited, prepared, and a failed `EditResult` for each other one
    (by index): malformed, or (`reject_already_predicted`) asking for what the model already says."""
    failed: dict[int, EditResult] = {}
    prepared: list[PreparedRequest] = []
    for index, request in indexed_requests:
        try:
            prepared.append(prepare(lm, index, request, templates, kl_prompts))
        except EditRequestError as error:
            failed[index] = EditResult(index, request, error=error)
    if not reject_already_predicted:
        return prepared, failed
    kept = []
    for p, predicted in zip(prepared, already_predicted(lm, prepared), strict=True):
        if predicted:
            request_id = p.request.id if p.request.id is not None else p.index
            reason = f"target_new {p.request.target_new!r} is already the greedy answer"
            error = EditRequestError(p.index, request_id, reason)
            failed[p.index] = EditResult(p.index, p.request, error=error)
        else:
            kept.append(p)
    return kept, failed
