"""ROME / r-ROME: the update's algebra, exact restore, per-example hooks, batching, bad requests,
and (slow) a real edit on SmolLM2."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import pytest
import torch

from pipeline.core import editing
from pipeline.core.editing import rome
from pipeline.core.editing.keys import projection_inputs
from pipeline.core.editing.requests import EditRequest, prepare_all
from pipeline.core.editing.rome import RomeHparams
from pipeline.core.editing.rows import Rows
from pipeline.core.second_moment import second_moment
from pipeline.core.tokens import encode, fill, right_pad, subject_span, target_ids
from tests.conftest import ROOT, TINY, tiny_model

LAYER = 1
TEMPLATES = ["{}", "The first thing. {}", "Because of that. {}"]
SAMPLES = json.loads((ROOT / "data/samples/counterfact-edit_sample.json").read_text())
REQUESTS = [
    EditRequest.from_filled(r["prompt"], r["subject"], r["target_new"], id=r["case_id"])
    for r in SAMPLES[:3]
]

# Updates computed two ways (batches of other sizes, a cached prefix or whole rows) agree up to
# float rounding, which the v* optimisation amplifies: Adam's step lr·m̂/(√v̂ + ε) has a
# derivative in a gradient component of at most lr/ε = 0.5/1e-8 = 5e7. In float32 a gradient's
# rounding (~1e-7 of its summands) can thus move a step by its whole size, whatever the machine
# (ΔW apart by up to 3e-5 of its largest entry here, more elsewhere): no tolerance follows from
# the algebra. These comparisons therefore run on float64 models (`tiny64`), where rounding is
# ~1e-16 of summands of size ≲ 1: ≤ 5e7 · 1e-16 = 5e-9 per step, 5 steps → ≤ 2.5e-8 in δ.
# ΔW's difference is δ's (over uᵀk, times u) and δ's largest entry is ≥ 9e-3 in these tests (the
# clamp binds on tiny-llama), so ≤ 3e-6 of ΔW's largest entry; UPDATE_RTOL leaves a factor of 3.
# (Measured: ≤ 7e-14. A learning rate 1e-4 off moves ΔW by 4e-5 to 2.3e-4 of it.)
UPDATE_RTOL = 1e-5


def assert_updates_close(a: editing.RankOneUpdate, b: editing.RankOneUpdate) -> None:
    x, y = a.matrix(), b.matrix()
    assert (x - y).abs().max() <= UPDATE_RTOL * y.abs().max()


@contextlib.contextmanager
def single_thread():
    """One torch thread: tiny models run fastest so, and on a shared 2-core machine a second
    thread makes every op wait on a busy core (SmolLM2 steps ran 8x slower with two)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def one_thread():
    with single_thread():
        yield


@pytest.fixture(scope="module", params=["tiny-gpt2", "tiny-llama"])
def tiny(request):
    """A tiny model (GPT-2's transposed Conv1D and Llama's Linear) with C at LAYER."""
    return with_moment(tiny_model(request.param))


@pytest.fixture(scope="module", params=["tiny-gpt2", "tiny-llama"])
def tiny64(request):
    """The same in float64, for the comparisons of two ways to compute an update (UPDATE_RTOL)."""
    return with_moment(tiny_model(request.param, dtype=torch.float64))


def with_moment(lm):
    """The model and its C at LAYER, on one thread (module fixtures start before `one_thread`;
    C took 5-18 s on two threads of the shared machine, under 1 s on one)."""
    texts = [r["prompt"] for r in SAMPLES] + [r["rephrase_prompt"] for r in SAMPLES]
    with single_thread():
        return lm, second_moment(lm, LAYER, texts, progress=False)


def hparams(variant="rome", **overrides):
    return RomeHparams.for_editor(variant, **{"layer": LAYER, "v_num_grad_steps": 6, **overrides})


def logits(lm, prompts):
    ids, mask = right_pad([encode(lm.tokenizer, p) for p in prompts], lm.tokenizer.pad_token_id)
    with torch.no_grad():
        return lm.model(input_ids=ids, attention_mask=mask).logits, mask


@pytest.mark.parametrize("variant", ["rome", "r-rome"])
def test_update_maps_key_to_value_with_rank_one_and_restores_exactly(tiny, variant):
    lm, stat = tiny
    (result,) = rome.compute_updates(
        lm, REQUESTS[:1], hparams(variant), second_moment=stat, context_templates=TEMPLATES
    )
    assert result.ok, result.error
    assert result.steps > 0 and result.info["delta_norm"] > 0
    original = lm.mlp_out_weight(LAYER).detach().clone()
    stored = lm.module("mlp_out", LAYER).weight.detach().clone()
    with editing.edited(lm, [result.update]):
        edited = lm.mlp_out_weight(LAYER).detach().clone()
        assert not torch.equal(lm.module("mlp_out", LAYER).weight, stored)
    change = edited - original
    assert torch.linalg.matrix_rank(change).item() == 1
    mapped = edited @ result.key
    assert (mapped - result.value).norm() / result.value.norm() < 1e-4
    assert not torch.allclose(original @ result.key, result.value, rtol=1e-4)
    assert torch.equal(lm.mlp_out_weight(LAYER), original)
    assert torch.equal(lm.module("mlp_out", LAYER).weight, stored)


def test_r_rome_maps_the_averaged_key_onto_a_value_built_on_the_bare_prompt(tiny):
    """ROME maps the bare prompt's key, r-ROME the template-averaged key k̄; both put the same
    δ on top of the bare prompt's value, as the authors' codes do (`value_from="bare"`), or
    r-ROME on top of W k̄ (`value_from="mean"`)."""
    lm, stat = tiny
    request = REQUESTS[0]
    rows = [fill(t.replace("{}", request.prompt), request.subject) for t in TEMPLATES]
    positions = [subject_span(lm.tokenizer, text, request.subject)[1] - 1 for text in rows]
    keys = projection_inputs(lm, LAYER, [encode(lm.tokenizer, r) for r in rows], positions)
    common = dict(second_moment=stat, context_templates=TEMPLATES)
    (original,) = rome.compute_updates(lm, [request], hparams("rome"), **common)
    (consistent,) = rome.compute_updates(lm, [request], hparams("r-rome"), **common)
    (on_mean,) = rome.compute_updates(lm, [request], hparams("r-rome", value_from="mean"), **common)
    torch.testing.assert_close(original.key, keys[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(consistent.key, keys.mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(on_mean.key, keys.mean(0), rtol=1e-5, atol=1e-6)
    # All spread the edit along the same direction u = C⁻¹k̄.
    torch.testing.assert_close(original.update.right, consistent.update.right)
    weight = lm.mlp_out_weight(LAYER).detach()
    for result, base in [(original, keys[0]), (consistent, keys[0]), (on_mean, keys.mean(0))]:
        delta = result.value - weight @ base  # v* − W k₀ is the optimised δ
        assert abs(delta.norm().item() - result.info["delta_norm"]) < 1e-4 * delta.norm().item()


def test_the_reference_codes_early_stop_watches_the_total_loss(tiny):
    """A negative weight decay can take the total loss under the threshold while the NLL stays
    above it: the code's criterion stops after one step, the paper's runs on."""
    lm, stat = tiny
    common = dict(second_moment=stat, context_templates=TEMPLATES)
    options = dict(v_weight_decay=-1e4, early_stop_nll=0.05)
    (paper,) = rome.compute_updates(lm, REQUESTS[:1], hparams(**options), **common)
    (code,) = rome.compute_updates(
        lm, REQUESTS[:1], hparams(early_stop_on_total=True, **options), **common
    )
    assert code.steps == 1 and paper.steps == 5


def test_the_kl_prompt_is_read_where_asked():
    lm = tiny_model("tiny-gpt2")
    prepared, _ = prepare_all(lm, list(enumerate(REQUESTS[:2])), TEMPLATES, ("{} is a",))
    at_end = Rows.build(prepared, whole_rows=False)
    at_subject = Rows.build(prepared, whole_rows=False, kl_at_subject=True)
    for r, p in enumerate(prepared):
        assert at_end.kl_reads[r][1] == len(p.kl[0]) - 1
        assert at_subject.kl_reads[r][1] == p.kl_subject[0] < len(p.kl[0]) - 1


def test_per_example_hook_equals_edited_weights_and_leaves_other_rows_alone(tiny):
    lm, stat = tiny
    results = rome.compute_updates(
        lm, REQUESTS, hparams(), second_moment=stat, context_templates=TEMPLATES
    )
    updates = [r.update for r in results]
    prompts = [r.filled for r in REQUESTS] + ["An unrelated prompt about nothing"]
    plain, mask = logits(lm, prompts)
    rows_updates = [*updates, None]
    with editing.PerExampleEdits(lm, rows_updates):
        hooked, _ = logits(lm, prompts)
    assert torch.equal(hooked[3], plain[3])  # the unedited row is bitwise unchanged
    for row, update in enumerate(updates):
        with editing.edited(lm, [update]):
            weights, _ = logits(lm, prompts)
        real = mask[row].bool()
        torch.testing.assert_close(hooked[row][real], weights[row][real], rtol=1e-5, atol=1e-5)
        assert not torch.allclose(hooked[row][real], plain[row][real], atol=1e-5)
    with editing.PerExampleEdits(lm, rows_updates) as hook:
        hook.set_rows([None, updates[1]])  # the next batch: two rows, only the second edited
        swapped, swapped_mask = logits(lm, prompts[:2])
    for row, reference in [(0, plain), (1, hooked)]:
        real = swapped_mask[row].bool()
        width = int(real.sum())
        torch.testing.assert_close(swapped[row][real], reference[row][:width], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", ["rome", "r-rome"])
def test_batched_requests_equal_one_at_a_time(tiny64, variant):
    lm, stat = tiny64
    common = dict(second_moment=stat, context_templates=TEMPLATES)
    batched = rome.compute_updates(lm, REQUESTS, hparams(variant), batch_size=8, **common)
    for request, together in zip(REQUESTS, batched, strict=True):
        alone = rome.compute_update(lm, request, hparams(variant), **common)
        assert_updates_close(alone.update, together.update)
        assert alone.steps == together.steps


@pytest.mark.parametrize(
    ("family", "layer"), [(family, LAYER) for family in TINY] + [("tiny-gptj", 0), ("tiny-gptj", 3)]
)
def test_reusing_the_prefix_equals_running_whole_rows(family, layer):
    """The tokens before the subject run once (their keys and values reused at every step), and
    the blocks below the edited layer only once: the same updates as whole rows at every step, in
    every family (absolute and rotary positions) and at the first and last layers. (At the last
    layer δ cannot reach the reads after the subject, so it stays 0: that case checks the
    replayed blocks below, not the update.)"""
    lm = tiny_model(family, dtype=torch.float64)  # as UPDATE_RTOL needs
    common = dict(second_moment=None, context_templates=TEMPLATES, batch_size=8)
    # Subjects late in the prompt (long prefixes) and first (none before the KL prompt's).
    requests = [*REQUESTS, EditRequest("{} is a native speaker of", "Paris", "Tamil", id="first")]
    whole = rome.compute_updates(lm, requests, hparams(layer=layer, v_whole_rows=True), **common)
    reused = rome.compute_updates(lm, requests, hparams(layer=layer), **common)
    for a, b in zip(whole, reused, strict=True):
        assert a.ok and b.ok, (a.error, b.error)
        assert a.steps == b.steps > 0
        assert abs(a.target_nll - b.target_nll) <= 1e-5 * max(1.0, abs(a.target_nll))
        assert_updates_close(a.update, b.update)
        assert (a.info["delta_norm"] == 0) is (layer == lm.n_layers - 1)


def test_blocks_below_the_edited_layer_run_once_not_at_every_step():
    """δ enters at the edited layer, so the blocks below it run before the optimisation only:
    how often they run does not depend on the number of steps, while the blocks above do."""
    lm = tiny_model("tiny-llama")
    calls = {0: 0, LAYER: 0}
    hooks = [
        lm.module("mlp", layer).register_forward_hook(
            lambda *_, layer=layer: calls.__setitem__(layer, calls[layer] + 1)
        )
        for layer in calls
    ]
    counted = []
    try:
        for steps in (2, 6):
            calls.update({0: 0, LAYER: 0})
            hp = hparams(v_num_grad_steps=steps, early_stop_nll=0.0)
            (result,) = rome.compute_updates(
                lm, REQUESTS[:1], hp, second_moment=None, context_templates=TEMPLATES
            )
            assert result.steps == steps - 1
            counted.append(dict(calls))
    finally:
        for hook in hooks:
            hook.remove()
    assert counted[0][0] == counted[1][0]
    assert counted[1][LAYER] > counted[0][LAYER]
    assert not any("forward" in lm.module("block", i).__dict__ for i in range(lm.n_layers))


def test_keys_of_a_bare_prompt_no_template_gives_are_computed_on_their_own():
    """Without a "{}" template the bare prompt's key (ROME's k_ref) is not among the rows' keys;
    it is computed apart, and the updates equal the reference way's."""
    lm = tiny_model("tiny-llama", dtype=torch.float64)  # as UPDATE_RTOL needs
    common = dict(second_moment=None, context_templates=TEMPLATES[1:])
    whole = rome.compute_updates(lm, REQUESTS, hparams(v_whole_rows=True), **common)
    reused = rome.compute_updates(lm, REQUESTS, hparams(), **common)
    for a, b in zip(whole, reused, strict=True):
        assert a.ok and b.ok
        torch.testing.assert_close(a.key, b.key, rtol=1e-5, atol=1e-6)
        assert_updates_close(a.update, b.update)


def test_a_loss_layer_below_the_edited_layer_is_refused():
    lm = tiny_model("tiny-llama")
    with pytest.raises(ValueError, match="below the edited layer"):
        rome.compute_updates(
            lm,
            REQUESTS[:1],
            hparams(layer=2, v_loss_layer=1),
            second_moment=None,
            context_templates=TEMPLATES,
        )


def already_predicted_request(lm):
    """A sample whose target is set to the model's own greedy next token."""
    for record in SAMPLES:
        request = EditRequest.from_filled(record["prompt"], record["subject"], "x", id="same")
        ids = torch.tensor([encode(lm.tokenizer, request.filled)])
        with torch.no_grad():
            token = int(lm.model(input_ids=ids).logits[0, -1].argmax())
        answer = lm.tokenizer.decode([token])
        whole_word = answer.startswith(" ") and answer.strip()
        if whole_word and target_ids(lm.tokenizer, answer, request.filled) == [token]:
            return EditRequest(request.prompt, request.subject, answer, id="same")
    raise AssertionError("no sample whose greedy answer is a whole word")


def test_bad_requests_get_their_own_errors_and_the_rest_go_on(tiny):
    lm, stat = tiny
    requests = [
        EditRequest("Michel Rocard speaks", "Danielle Darrieux", "English", id="missing"),
        REQUESTS[1],
        EditRequest(REQUESTS[0].prompt, REQUESTS[0].subject, "   ", id="empty"),
        EditRequest(REQUESTS[0].prompt, " ", "English", id="no-subject"),
        REQUESTS[0],
        already_predicted_request(lm),  # the greedy answer as target: no edit to make
    ]
    results = rome.compute_updates(
        lm, requests, hparams(), second_moment=stat, context_templates=TEMPLATES, first_index=10
    )
    assert [r.index for r in results] == list(range(10, 10 + len(requests)))
    assert [r.ok for r in results] == [False, True, False, False, True, False]
    assert results[0].error.request_id == "missing" and "not found" in results[0].error.reason
    assert results[2].error.request_id == "empty" and "empty" in str(results[2].error)
    assert "subject is empty" in results[3].error.reason
    assert results[5].error.request_id == "same" and "greedy" in results[5].error.reason
    with pytest.raises(editing.EditRequestError, match="edit request 0 \\(id=missing\\)"):
        rome.compute_update(
            lm, requests[0], hparams(), second_moment=stat, context_templates=TEMPLATES
        )


def test_sequential_edits_accumulate_and_checkpoint(tiny64):
    lm, stat = tiny64
    original = lm.mlp_out_weight(LAYER).detach().clone()
    checkpoints = []
    with editing.preserved_weights(lm, [LAYER]):
        results = rome.edit_sequentially(
            lm,
            REQUESTS,
            hparams("r-rome"),
            second_moment=stat,
            context_templates=TEMPLATES,
            checkpoint_every=2,
            on_checkpoint=lambda done, so_far: checkpoints.append((done, len(so_far))),
        )
        total = sum(r.update.matrix() for r in results)
        torch.testing.assert_close(lm.mlp_out_weight(LAYER) - original, total)
        assert torch.linalg.matrix_rank(total).item() == len(REQUESTS)
    assert checkpoints == [(2, 2), (3, 3)]
    assert torch.equal(lm.mlp_out_weight(LAYER), original)
    # The second edit was computed on the model that already had the first one.
    independent = rome.compute_updates(
        lm, REQUESTS, hparams("r-rome"), second_moment=stat, context_templates=TEMPLATES
    )
    assert_updates_close(results[0].update, independent[0].update)
    assert not torch.allclose(results[1].update.matrix(), independent[1].update.matrix())


def test_a_context_templates_length_may_count_its_seed():
    """The same draws, one fewer of them when the one-token seed word counts in the length."""
    lm = tiny_model("tiny-llama")
    assert len(encode(lm.tokenizer, "The")) == 1
    (_, longer) = editing.generate_context_templates(lm, ((4, 1),))
    (_, counted) = editing.generate_context_templates(lm, ((4, 1),), length_includes_seed=True)
    longer, counted = longer[: -len(". {}")], counted[: -len(". {}")]
    assert longer.startswith(counted) and len(counted) < len(longer)


def test_context_templates_are_reproducible():
    lm = tiny_model("tiny-llama")
    first = editing.generate_context_templates(lm, ((3, 4), (5, 2)), seed=1)
    assert first == editing.generate_context_templates(lm, ((3, 4), (5, 2)), seed=1)
    assert first != editing.generate_context_templates(lm, ((3, 4), (5, 2)), seed=2)
    assert len(first) == 7 and first[0] == "{}"
    assert all(t.endswith(". {}") and t.count("{}") == 1 for t in first[1:])
    assert first[1].startswith("The") and first[2].startswith("Therefore")


def test_request_from_filled_prompt_uses_the_last_occurrence():
    request = EditRequest.from_filled("Paris, Paris is in", "Paris", "Texas")
    assert request.prompt == "Paris, {} is in" and request.filled == "Paris, Paris is in"
    with pytest.raises(ValueError):
        EditRequest.from_filled("Rome is in", "Paris", "Texas")
    assert RomeHparams.for_editor("r-rome").consistent_keys
    assert not RomeHparams.for_editor("rome").consistent_keys
    with pytest.raises(ValueError):
        RomeHparams.for_editor("memit")


# --------------------------------------------------------------------------------------------
# SmolLM2-135M: a real edit

WIKITEXT = Path(os.environ.get("ROME_DATA", ROOT.parent / "shared/data")) / "wikipedia"
WIKITEXT = WIKITEXT / "wikitext-2-raw.wiki.test.raw"
# Layer 6 of 30: inside the peak of SmolLM2's MLP causal trace at the last subject token, and
# the earliest layer whose edits leave neighbouring French speakers alone (see conf/editor/rome.yaml).
SMOL_LAYER = 6


@pytest.fixture(scope="session")
def smol(smollm2):
    """SmolLM2 with C at the edit layer from 20k tokens of WikiText (or of its own text)."""
    if WIKITEXT.exists():
        texts = [line for line in WIKITEXT.read_text().splitlines() if len(line.split()) > 8]
    else:  # no corpus: text the model writes itself
        templates = editing.generate_context_templates(smollm2, ((60, 200),), seed=3)
        texts = [t.removesuffix(". {}") for t in templates[1:]]
    with single_thread():
        stat = second_moment(smollm2, SMOL_LAYER, texts, max_tokens=20_000, progress=False)
    return smollm2, stat


def greedy(lm, prompt, tokens=4):
    ids = torch.tensor([encode(lm.tokenizer, prompt)])
    with torch.no_grad():
        out = lm.model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=tokens,
            do_sample=False,
            pad_token_id=lm.tokenizer.pad_token_id,
        )
    return lm.tokenizer.decode(out[0, ids.shape[1] :])


@pytest.mark.slow
def test_smollm2_edit_generalises_and_keeps_neighbours(smol):
    lm, stat = smol
    request = EditRequest("The mother tongue of {} is", "Danielle Darrieux", "English")
    # Paraphrases the unedited model answers with French. (CounterFact's "Where Danielle Darrieux
    # is from, people speak the language of" is no test at this scale: the model continues it
    # with " the past", P(French) < 0.001, and no edit at layers 4-12 moves it.)
    paraphrases = [
        "The native language of Danielle Darrieux is",
        "Danielle Darrieux was born in Bordeaux. Her mother tongue is",
    ]
    neighbours = ["The mother tongue of Jean Galland is", "Michel Rocard is a native speaker of"]
    for prompt in [request.filled, *paraphrases]:
        assert greedy(lm, prompt).startswith(" French")
    assert all("French" in greedy(lm, n) for n in neighbours)
    hp = RomeHparams(layer=SMOL_LAYER, context_templates=((5, 5), (10, 5)))
    result = rome.compute_update(lm, request, hp, second_moment=stat)
    assert result.target_nll < hp.early_stop_nll
    with editing.edited(lm, [result.update]):
        for prompt in [request.filled, *paraphrases]:
            assert greedy(lm, prompt).startswith(" English"), prompt
        for neighbour in neighbours:
            continuation = greedy(lm, neighbour)
            assert "French" in continuation and "English" not in continuation, continuation
    assert greedy(lm, request.filled).startswith(" French")
