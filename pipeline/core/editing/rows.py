"""The rows of the target-value optimisation (ROME's v*, MEMIT's z), fixed for the whole
optimisation: which tokens each row holds, where δ enters, what the loss reads, and which rows
run together. Its own module because both the optimisation (`values`) and the cached prefixes
(`prefixes`) read it, and neither may import the other's way up.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from pipeline.core.editing.requests import PreparedRequest


@dataclass
class Rows:
    """The v* optimisation's rows, fixed for the whole optimisation.

    Row i is tokens[i] (context + prompt + target[:-1], or a KL prompt) of request owner[i]; δ is
    added at column subject[i]. Everything before that column is untouched by δ (causal
    attention), so the first `split[i]` tokens can run once (`Prefixes`) and only the rest at
    every step. Rows with one `label` (one context template, or one KL prompt) start alike. The
    loss reads `reads` = (row, column, request), first the NLL reads (predicting `nll_tokens`),
    then the KL reads (the KL prompts' last tokens). `context_rows[r]` are request r's context
    rows, in template order.
    """

    tokens: list[list[int]] = field(default_factory=list)
    subject: list[int] = field(default_factory=list)
    owner: list[int] = field(default_factory=list)
    split: list[int] = field(default_factory=list)
    label: list[int] = field(default_factory=list)
    context_rows: list[list[int]] = field(default_factory=list)
    nll_reads: list[tuple[int, int, int]] = field(default_factory=list)
    nll_tokens: list[int] = field(default_factory=list)
    kl_reads: list[tuple[int, int, int]] = field(default_factory=list)

    @classmethod
    def build(
        cls, prepared: Sequence[PreparedRequest], whole_rows: bool, kl_at_subject: bool = False
    ) -> Rows:
        rows = cls()

        def add(tokens: list[int], subject: int, owner: int, label: int) -> int:
            rows.tokens.append(tokens)
            rows.subject.append(subject)
            rows.owner.append(owner)
            rows.split.append(0 if whole_rows else subject)
            rows.label.append(label)
            return len(rows.tokens) - 1

        for r, p in enumerate(prepared):
            rows.context_rows.append([])
            for t, (tokens, pos) in enumerate(zip(p.contexts, p.context_subject, strict=True)):
                row = add(tokens + p.target[:-1], pos, r, t)
                rows.context_rows[r].append(row)
                first = len(tokens) - 1  # the logits there predict the first target token
                rows.nll_reads += [(row, first + i, r) for i in range(len(p.target))]
                rows.nll_tokens += p.target
            for k, (tokens, pos) in enumerate(zip(p.kl, p.kl_subject, strict=True)):
                row = add(tokens, pos, r, len(p.contexts) + k)
                rows.kl_reads.append((row, pos if kl_at_subject else len(tokens) - 1, r))
        return rows

    def suffix_length(self, row: int) -> int:
        return len(self.tokens[row]) - self.split[row]

    def groups(self, rows: Sequence[int], whole_rows: bool) -> list[list[int]]:
        """The rows to run together at a step: rows of one length, so that nothing is padded
        (suffixes are short, 3 tokens on average for CounterFact and up to ~8: padding all to the
        longest would double the work). A group under `GROUP_TOKENS` tokens takes the next
        length in too, since many small passes cost more than a little padding."""
        if whole_rows:
            return [list(rows)]
        groups: list[list[int]] = []
        current: list[int] = []
        tokens = 0  # in current
        for row in sorted(rows, key=self.suffix_length):
            length = self.suffix_length(row)
            if current and length > self.suffix_length(current[-1]) and tokens >= GROUP_TOKENS:
                groups.append(current)
                current, tokens = [], 0
            current.append(row)
            tokens += length
        return [*groups, current] if current else groups


GROUP_TOKENS = 64
