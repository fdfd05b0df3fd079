"""Scoring CounterFact and zsRE cases on a model, many cases and edits per forward pass.

The paper's protocol edits each case independently on the unedited model. Here a batch of cases
runs together: every row (a prompt followed by a target) belongs to one case, and
`PerExampleEdits` adds that case's rank-one update to its rows only, so no weights are copied or
restored and the result equals editing, scoring and restoring one case at a time.

The metric formulas are in `metrics.counterfact`, `metrics.generation` and `metrics.zsre`. A NaN
or infinite NLL (a model or an edit whose numbers broke) stops the scoring naming the case
(`NonFiniteScore`): scored, a NaN probability would count as a failed edit, and an NS of 0 read as
a destroyed neighbourhood.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from metrics import zsre as zsre_metrics
from metrics.counterfact import PROMPT_KINDS, probability
from pipeline.core.editing.updates import PerExampleEdits, RankOneUpdate
from pipeline.core.models import LoadedModel
from pipeline.core.tokens import encode, right_pad, target_ids
from pipeline.data.records import CounterfactCase, ZsreCase


class NonFiniteScore(ValueError):
    """A target's NLL is NaN or infinite: there is no probability to score."""


@dataclass(frozen=True)
class Row:
    """One teacher-forced read-out: P(target | prompt) for a case."""

    case: int  # index into the batch of cases
    kind: str  # rewrite | paraphrase | neighborhood
    prompt: str
    target: str  # "new" | "true"


def case_rows(index: int, case: CounterfactCase) -> list[Row]:
    """The rows of a case: each of its prompts with both targets."""
    prompts = {
        "rewrite": [case.prompt],
        "paraphrase": list(case.paraphrase_prompts),
        "neighborhood": list(case.neighborhood_prompts),
    }
    return [
        Row(index, kind, prompt, target)
        for kind in PROMPT_KINDS
        for prompt in prompts[kind]
        for target in ("new", "true")
    ]


def too_long(
    lm: LoadedModel, case: CounterfactCase, *, edit_prefix: int = 0, new_tokens: int = 0
) -> tuple[str, str] | None:
    """The first of `case`'s inputs that would not fit the model's context, as (field, why);
    None if all fit. A row is a prompt and its target (teacher-forced); the rewrite prompt also
    gets `edit_prefix` tokens (the editor's longest context template), and with `new_tokens` the
    generation prompts get that many sampled tokens. Without this check such a case fails deep
    in the model (an IndexError on GPT-2's position table) with nothing named."""
    limit, tokenizer = lm.context_length, lm.tokenizer
    fields = (
        ("prompt", (case.prompt,), edit_prefix),
        ("paraphrase_prompts", case.paraphrase_prompts, 0),
        ("neighborhood_prompts", case.neighborhood_prompts, 0),
    )
    for name, prompts, extra in fields:
        for prompt in prompts:
            for target in (t for t in (case.target_new, case.target_true) if t is not None):
                size = len(encode(tokenizer, prompt)) + len(target_ids(tokenizer, target, prompt))
                if size - 1 + extra > limit:
                    what = " and the edit's context template" if extra else ""
                    return name, (
                        f"{size - 1 + extra} tokens with its target{what}, more than the "
                        f"model's context of {limit}"
                    )
    for prompt in case.generation_prompts if new_tokens else ():
        if len(encode(tokenizer, prompt)) + new_tokens > limit:
            return "generation_prompts", (
                f"{len(encode(tokenizer, prompt))} tokens and {new_tokens} to generate, more "
                f"than the model's context of {limit}"
            )
    return None


def _answer_logits(
    lm: LoadedModel,
    prompts: Sequence[str],
    targets: Sequence[str],
    updates: Sequence[RankOneUpdate | None] | None,
    batch_size: int,
):
    """Teacher-force each target after its prompt; yield per forward pass (entries, logits,
    tokens): for every answer token read there, the entry (index into prompts) it belongs to,
    the logits at the position before it, and the token. An entry's reads come in answer order
    and in one pass. `updates[i]` (optional) is the rank-one edit entry i sees; rows without one
    see the model as it is. Rows are right-padded, so each gets the numbers it would get alone.
    A prompt read for two single-token targets is one row, run once; rows run shortest first,
    and only the positions that predict a target are unembedded."""
    if len(prompts) != len(targets) or (updates is not None and len(updates) != len(prompts)):
        raise ValueError("prompts, targets (and updates) must have the same length")
    row_of: dict[tuple, int] = {}  # (tokens, update) -> its row
    rows: list[tuple[list[int], RankOneUpdate | None]] = []
    reads: list[list[tuple[int, int, int]]] = []  # per row: (entry, column, token)
    for entry, (prompt, target) in enumerate(zip(prompts, targets, strict=True)):
        prefix = encode(lm.tokenizer, prompt)
        answer = target_ids(lm.tokenizer, target, prompt)
        update = updates[entry] if updates is not None else None
        tokens = prefix + answer[:-1]
        key = (tuple(tokens), id(update))
        if key not in row_of:
            row_of[key] = len(rows)
            rows.append((tokens, update))
            reads.append([])
        reads[row_of[key]] += [(entry, len(prefix) - 1 + i, t) for i, t in enumerate(answer)]
    pad_id = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    order = sorted(range(len(rows)), key=lambda r: len(rows[r][0]))
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        ids, mask = right_pad([rows[r][0] for r in chunk], pad_id, lm.device)
        chunk_updates = [rows[r][1] for r in chunk]
        edits = (
            PerExampleEdits(lm, chunk_updates)
            if any(u is not None for u in chunk_updates)
            else contextlib.nullcontext()
        )
        with edits:
            hidden = lm.model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
        picked = [(b, *read) for b, r in enumerate(chunk) for read in reads[r]]
        batch_rows, entries, columns, tokens = (
            torch.as_tensor(column, device=lm.device) for column in zip(*picked, strict=True)
        )
        yield entries, lm.module("unembed")(hidden[batch_rows, columns]).float(), tokens


@torch.no_grad()
def target_nlls(
    lm: LoadedModel,
    prompts: Sequence[str],
    targets: Sequence[str],
    *,
    updates: Sequence[RankOneUpdate | None] | None = None,
    batch_size: int = 32,
) -> list[float]:
    """Mean NLL per token of each target after its prompt, teacher-forced (`_answer_logits`)."""
    totals = torch.zeros(len(prompts), dtype=torch.float64)
    counts = torch.zeros(len(prompts), dtype=torch.float64)
    for entries, logits, tokens in _answer_logits(lm, prompts, targets, updates, batch_size):
        log_probs = logits.log_softmax(-1)[torch.arange(len(tokens)), tokens]
        totals.index_add_(0, entries.cpu(), -log_probs.double().cpu())
        counts.index_add_(0, entries.cpu(), torch.ones(len(tokens), dtype=torch.float64))
    return (totals / counts).tolist()


@torch.no_grad()
def answer_top1(
    lm: LoadedModel,
    prompts: Sequence[str],
    targets: Sequence[str],
    *,
    updates: Sequence[RankOneUpdate | None] | None = None,
    batch_size: int = 32,
) -> list[tuple[list[int], list[int]]]:
    """Per prompt, (the model's top-1 token before each answer token, the answer's tokens),
    teacher-forced (`_answer_logits`): what zsRE's token accuracy compares (`metrics.zsre`).

    Departure from ROME's `eval_utils_zsre.py`: the prompt and the answer's tokens are fed as
    token ids (the answer tokenized after its prompt, `tokens.target_ids`), where the reference
    re-tokenizes the text prompt + decode(a_1 .. a_{j-1}) for each j and compares with the first
    token of re-encoding decode(a_j). The two agree wherever re-tokenizing the decoded text gives
    back the same tokens (GPT-2's BPE, on plain words); a tokenizer that adds a BOS token gets it
    here, as every other score of this module."""
    out: list[tuple[list[int], list[int]]] = [([], []) for _ in prompts]
    for entries, logits, tokens in _answer_logits(lm, prompts, targets, updates, batch_size):
        predicted = logits.argmax(-1).tolist()
        for entry, guess, token in zip(entries.tolist(), predicted, tokens.tolist(), strict=True):
            out[entry][0].append(guess)
            out[entry][1].append(token)
    return out


def score_cases(
    lm: LoadedModel,
    cases: Sequence[CounterfactCase],
    updates: Sequence[RankOneUpdate | None] | None = None,
    *,
    batch_size: int = 32,
) -> list[dict[str, list[tuple[float, float]]]]:
    """Per case and prompt kind, [(P(new), P(true)) per prompt], each case under its own update."""
    rows = [row for index, case in enumerate(cases) for row in case_rows(index, case)]
    targets = [
        cases[r.case].target_new if r.target == "new" else cases[r.case].target_true for r in rows
    ]
    row_updates = [updates[r.case] for r in rows] if updates is not None else None
    nlls = target_nlls(
        lm, [r.prompt for r in rows], targets, updates=row_updates, batch_size=batch_size
    )
    scores: list[dict[str, list]] = [{kind: [] for kind in PROMPT_KINDS} for _ in cases]
    pending: dict[tuple[int, str, str], float] = {}
    for i, (row, target, nll) in enumerate(zip(rows, targets, nlls, strict=True)):
        if not math.isfinite(nll):
            edit = "under its edit" if row_updates and row_updates[i] is not None else "unedited"
            raise NonFiniteScore(
                f"case {cases[row.case].id}: the NLL of {target!r} after {row.prompt!r} is {nll} "
                f"({edit}); the model's numbers broke, there is no probability to score"
            )
        key = (row.case, row.kind, row.prompt)
        if row.target == "new":
            pending[key] = probability(nll)
        else:
            scores[row.case][row.kind].append((pending.pop(key), probability(nll)))
    return scores


@torch.no_grad()
def generate(
    lm: LoadedModel,
    prompts: Sequence[str],
    *,
    updates: Sequence[RankOneUpdate | None] | None = None,
    max_new_tokens: int = 100,
    top_k: int = 5,
    seed: int = 0,
    batch_size: int = 16,
) -> list[str]:
    """Top-k sampled continuations (ROME's fluency protocol), seeded; row i under updates[i].

    Prompts are left-padded. Each batch is sampled from the seed plus its offset, so a rerun
    gives the same texts; a different batch size gives other (equally distributed) samples.
    The global random state is left as it was.
    """
    tokenizer = lm.tokenizer
    pad_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    )
    texts: list[str] = []
    for start in range(0, len(prompts), batch_size):
        chunk = [encode(tokenizer, p) for p in prompts[start : start + batch_size]]
        width = max(len(c) for c in chunk)
        ids = torch.tensor([[pad_id] * (width - len(c)) + c for c in chunk], device=lm.device)
        mask = torch.tensor(
            [[0] * (width - len(c)) + [1] * len(c) for c in chunk], device=lm.device
        )
        chunk_updates = list(updates[start : start + batch_size]) if updates is not None else None
        edits = (
            PerExampleEdits(lm, chunk_updates)
            if chunk_updates and any(u is not None for u in chunk_updates)
            else contextlib.nullcontext()
        )
        devices = [lm.device] if lm.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), edits:
            torch.manual_seed(seed + start)
            out = lm.model.generate(
                input_ids=ids,
                attention_mask=mask,
                do_sample=True,
                top_k=top_k,
                max_new_tokens=max_new_tokens,
                pad_token_id=pad_id,
            )
        texts += tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    return texts


ZSRE_FAMILIES = ("rewrite", "paraphrase", "neighborhood")


def zsre_rows(case: ZsreCase) -> list[tuple[str, str, str]]:
    """(family, prompt, answer) of a zsRE case, in the reference's order."""
    return [
        ("rewrite", case.prompt, case.target_new),
        *(("paraphrase", p, case.target_new) for p in case.paraphrase_prompts),
        ("neighborhood", case.neighborhood_prompt, case.neighborhood_answer),
    ]


def score_zsre_cases(
    lm: LoadedModel,
    cases: Sequence[ZsreCase],
    updates: Sequence[RankOneUpdate | None] | None = None,
    *,
    batch_size: int = 32,
) -> list[dict[str, list[list[bool]]]]:
    """Per case and family, one list per prompt of its answer tokens' top-1 correctness, each
    case under its own update (`metrics.zsre` turns them into efficacy, paraphrase,
    specificity)."""
    rows = [(index, *row) for index, case in enumerate(cases) for row in zsre_rows(case)]
    row_updates = [updates[r[0]] for r in rows] if updates is not None else None
    reads = answer_top1(
        lm,
        [r[2] for r in rows],
        [r[3] for r in rows],
        updates=row_updates,
        batch_size=batch_size,
    )
    out: list[dict[str, list[list[bool]]]] = [{f: [] for f in ZSRE_FAMILIES} for _ in cases]
    for (index, family, _, _), (predicted, answer) in zip(rows, reads, strict=True):
        out[index][family].append(zsre_metrics.token_correct(predicted, answer))
    return out
