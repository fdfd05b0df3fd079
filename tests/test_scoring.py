"""Scoring cases under per-case edits: batched equals one case at a time with edited weights."""

from __future__ import annotations

import math

import pytest
import torch

from metrics.counterfact import case_metrics
from pipeline.core import editing
from pipeline.core.editing import rome
from pipeline.core.editing.rome import RomeHparams
from pipeline.core.editing.updates import RankOneUpdate
from pipeline.core.scoring import NonFiniteScore, generate, score_cases, target_nlls
from pipeline.core.second_moment import second_moment
from pipeline.core.tokens import encode, target_ids
from pipeline.data.records import load_counterfact
from tests.conftest import ROOT, tiny_model

CASES = load_counterfact(ROOT / "data/samples/counterfact-edit_sample.json", limit=4).records


@pytest.fixture(scope="module", params=["tiny-gpt2", "tiny-llama"])
def edited_cases(request):
    torch.set_num_threads(1)
    lm = tiny_model(request.param)
    stat = second_moment(lm, 1, [c.prompt for c in CASES] * 5, progress=False)
    hp = RomeHparams(layer=1, v_num_grad_steps=4, context_templates=((3, 2),))
    requests = [editing.EditRequest(c.template, c.subject, c.target_new) for c in CASES]
    results = rome.compute_updates(lm, requests, hp, second_moment=stat)
    assert all(r.ok for r in results)
    return lm, [r.update for r in results]


def test_target_nll_by_hand(edited_cases):
    lm, _ = edited_cases
    prompt, target = "The mother tongue of Danielle Darrieux is", "French"
    ids, answer = encode(lm.tokenizer, prompt), target_ids(lm.tokenizer, target, prompt)
    with torch.no_grad():
        logits = lm.model(torch.tensor([ids + answer])).logits[0].log_softmax(-1)
    expected = -sum(float(logits[len(ids) - 1 + i, t]) for i, t in enumerate(answer)) / len(answer)
    (nll,) = target_nlls(lm, [prompt], [target])
    assert nll == pytest.approx(expected, abs=1e-5)


def test_batched_cases_equal_one_at_a_time_with_edited_weights(edited_cases):
    lm, updates = edited_cases
    # One forward pass for all cases (and a case without an edit mixed in), small passes too.
    mixed = updates[:3] + [None]
    batched = score_cases(lm, CASES, mixed, batch_size=64)
    small = score_cases(lm, CASES, mixed, batch_size=3)
    for index, (case, update) in enumerate(zip(CASES, mixed, strict=True)):
        if update is None:
            (alone,) = score_cases(lm, [case])
        else:
            with editing.edited(lm, [update]):
                (alone,) = score_cases(lm, [case])
        for kind, pairs in alone.items():
            for got in (batched[index][kind], small[index][kind]):
                assert len(got) == len(pairs)
                for (a_new, a_true), (b_new, b_true) in zip(got, pairs, strict=True):
                    assert a_new == pytest.approx(b_new, abs=1e-5, rel=1e-5)
                    assert a_true == pytest.approx(b_true, abs=1e-5, rel=1e-5)
        metrics_batched, metrics_alone = case_metrics(batched[index]), case_metrics(alone)
        for name, value in metrics_alone.items():
            assert metrics_batched[name] == pytest.approx(value, abs=1e-5)
    # The edits changed something: scores under the updates differ from the unedited ones.
    unedited = score_cases(lm, CASES)
    assert unedited[0]["rewrite"] != batched[0]["rewrite"]
    assert math.isclose(unedited[3]["rewrite"][0][0], batched[3]["rewrite"][0][0], rel_tol=1e-5)


def test_generation_is_seeded_and_edit_aware(edited_cases):
    lm, updates = edited_cases
    prompts = [CASES[0].prompt, CASES[1].prompt]
    first = generate(lm, prompts, max_new_tokens=8, seed=3)
    assert first == generate(lm, prompts, max_new_tokens=8, seed=3)
    state = torch.random.get_rng_state()
    generate(lm, prompts, max_new_tokens=8, seed=3)
    assert torch.equal(state, torch.random.get_rng_state())  # global RNG untouched
    assert len(first) == 2 and all(isinstance(t, str) for t in first)


def test_inputs_longer_than_the_context_are_named_by_field():
    import dataclasses

    from pipeline.core.scoring import too_long

    lm = tiny_model("tiny-gpt2")  # 256 positions
    case = load_counterfact(ROOT / "data/samples/counterfact-edit_sample.json", limit=1).records[0]
    assert too_long(lm, case) is None
    long = " and".join(["the river"] * 200)
    field, why = too_long(lm, dataclasses.replace(case, paraphrase_prompts=(long,)))
    assert field == "paraphrase_prompts" and "more than the model's context of 256" in why
    assert too_long(lm, case, edit_prefix=250)[0] == "prompt"  # the edit's template counts
    gen = dataclasses.replace(case, generation_prompts=(case.prompt,))
    assert too_long(lm, gen, new_tokens=250)[0] == "generation_prompts"
    assert too_long(lm, gen, new_tokens=10) is None
    with pytest.raises(IndexError):  # what used to happen, with nothing named
        score_cases(lm, [dataclasses.replace(case, paraphrase_prompts=(long,))])


def test_a_non_finite_score_is_an_error_naming_the_case(edited_cases):
    """A NaN probability used to be scored as a failed edit (and an NS of 0)."""
    lm, updates = edited_cases
    broken = RankOneUpdate(
        updates[0].layer, torch.full_like(updates[0].left, math.nan), updates[0].right
    )
    with pytest.raises(
        NonFiniteScore, match=rf"case {CASES[1].id}: the NLL .* is nan \(under its edit\)"
    ):
        score_cases(lm, CASES[:2], [updates[0], broken])
