"""zsRE's metrics as ROME and MEMIT score them (kmeng01/rome `experiments/py/eval_utils_zsre.py`,
`dsets/zsre.py`, `experiments/summarize.py`).

Every prompt is followed by its answer's tokens a_1 .. a_m (the answer with a leading space),
teacher-forced. Token j is correct when the model's top-1 prediction at the position before it
is a_j:

    correct_j = [argmax_v logits(prompt, a_1 .. a_{j-1})_v == a_j]

A case's score on a prompt family is the mean of `correct` over all its answer tokens (over its
prompts' tokens together, as the reference concatenates them); a metric is the mean of the case
scores over cases:

    efficacy      the question (`src`) with the new answer
    paraphrase    the rephrased question with the new answer
    specificity   an unrelated Natural Questions question (`loc` + "?") with its own answer
                  (`loc_ans`): the edited model's top-1 accuracy on the true answer's tokens

Specificity compares with the true answer's tokens, as the reference does, not with the unedited
model's predictions; the unedited model's own accuracy on them is the "pre" value beside it.

Over cases: the mean with a Wilson interval with n = the number of cases (a case's score is a
fraction in [0, 1], counted as a fractional success, as PS and NS in `metrics.counterfact`), in
percent. The reference reports a mean and a standard deviation, no interval.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from metrics.intervals import rate_ci

# metric name -> the prompt family it reads
FAMILIES = {"efficacy": "rewrite", "paraphrase": "paraphrase", "specificity": "neighborhood"}
METRICS = tuple(FAMILIES)


def token_correct(predicted: Sequence[int], answer: Sequence[int]) -> list[bool]:
    """Per answer token: is the top-1 prediction before it the token itself."""
    if len(predicted) != len(answer):
        raise ValueError(f"{len(predicted)} predictions for {len(answer)} answer tokens")
    return [int(p) == int(a) for p, a in zip(predicted, answer, strict=True)]


def family_score(correct: Sequence[Sequence[bool]]) -> float:
    """A case's score on one family: the mean over every answer token of its prompts (NaN
    without any)."""
    flags = [bool(flag) for prompt in correct for flag in prompt]
    return float(np.mean(flags)) if flags else math.nan


def case_metrics(correct: Mapping[str, Sequence[Sequence[bool]]]) -> dict[str, float]:
    """Efficacy, paraphrase and specificity (fractions) of one case from its per-token flags,
    `correct[family]` one list per prompt."""
    return {name: family_score(correct.get(family, ())) for name, family in FAMILIES.items()}


def summarize(cases: Sequence[Mapping[str, float]]) -> dict[str, Any]:
    """Each metric over cases in percent: mean, Wilson low/high and n (cases with a value)."""
    out: dict[str, Any] = {}
    for name in METRICS:
        values = [c[name] for c in cases if not math.isnan(c[name])]
        ci = rate_ci(values)
        out[name] = {k: (100 * v if k != "n" else v) for k, v in ci.items()}
    out["n_cases"] = len(cases)
    return out
