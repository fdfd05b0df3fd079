"""FT and FT-L: the editor against a plain Adam loop, the L∞ box, the reference's skip and early
stop, exact restore with nothing else changed, dense updates as hooks, and bad requests."""

from __future__ import annotations

import pytest
import torch
from hydra import compose, initialize_config_dir

from pipeline.app import editors
from pipeline.core import editing
from pipeline.core.editing.ft import FineTune, FtHparams
from pipeline.core.editing.requests import EditRequest
from pipeline.core.editing.rome import Rome, RomeHparams
from pipeline.core.scoring import score_cases
from pipeline.core.tokens import encode, target_ids
from pipeline.data.records import load_counterfact
from tests.conftest import ROOT, tiny_model

LAYER = 1
CASES = load_counterfact(ROOT / "data/samples/counterfact-edit_sample.json", limit=3).records
REQUESTS = [
    EditRequest(c.template, c.subject, c.target_new, target_true=c.target_true, id=c.id)
    for c in CASES
]
INDEXED = list(enumerate(REQUESTS))
# The editor pads a batch and unembeds only the positions it reads; the plain loop runs each
# request alone through the whole model, so their gradients differ by rounding. Adam amplifies
# that where a gradient component g is near zero: a step is lr·m̂/(√v̂ + ε), whose derivative in g
# is at most lr/ε = 5e-4/1e-8 = 5e4. In float32 a gradient's rounding (~1e-7 of its summands)
# can thus move a step by its whole size (lr), whatever the machine; no tolerance below 2·lr per
# step follows from the algebra. The comparisons therefore run on float64 models, where rounding
# is ~1e-16 of summands of size ≲ 1: ≤ 5e4 · 1e-14 = 5e-10 per step, 3 steps → ≤ 2e-9. ATOL
# leaves a factor of 5 above that, and stays 1e4 below the entries checked (> 1e-4).
ATOL = 1e-8


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=["tiny-gpt2", "tiny-llama"])
def lm(request):
    return tiny_model(request.param)


@pytest.fixture(scope="module", params=["tiny-gpt2", "tiny-llama"])
def lm64(request):
    """The same models in float64, for the exact comparisons with a plain Adam loop (ATOL)."""
    return tiny_model(request.param, dtype=torch.float64)


def hparams(**overrides) -> FtHparams:
    return FtHparams(**{"layer": LAYER, "steps": 3, "reject_already_predicted": False, **overrides})


def plain_fine_tune(lm, requests, steps, lr, eps=None, loss="teacher_forced"):
    """The formula, written out: Adam on the model's weight itself, one unpadded forward pass per
    request, loss = mean over requests of the mean target NLL; returns W − W0 (out, in)."""
    weight = lm.module("mlp_out", LAYER).weight
    saved = weight.detach().clone()
    before = lm.mlp_out_weight(LAYER).detach().clone()
    optimiser = torch.optim.Adam([weight], lr=lr, weight_decay=0.0)
    weight.requires_grad_(True)
    try:
        for _ in range(steps):
            losses = []
            for r in requests:
                prompt = encode(lm.tokenizer, r.filled)
                target = target_ids(lm.tokenizer, r.target_new, r.filled)
                if loss == "teacher_forced":
                    logits = lm.model(torch.tensor([prompt + target[:-1]])).logits[0]
                    log_probs = logits.log_softmax(-1)
                    nll = [-log_probs[len(prompt) - 1 + j, t] for j, t in enumerate(target)]
                else:
                    log_probs = lm.model(torch.tensor([prompt])).logits[0, -1].log_softmax(-1)
                    nll = [-log_probs[t] for t in target]
                losses.append(torch.stack(nll).mean())
            optimiser.zero_grad()
            torch.stack(losses).mean().backward()
            optimiser.step()
            if eps is not None:
                with torch.no_grad():
                    weight.copy_(torch.clamp(weight, saved - eps, saved + eps))
        return lm.mlp_out_weight(LAYER).detach() - before
    finally:
        weight.requires_grad_(False)
        weight.grad = None
        with torch.no_grad():
            weight.copy_(saved)


def snapshot(lm):
    return {
        name: (p.detach().clone(), p.requires_grad, p.grad)
        for name, p in lm.model.named_parameters()
    }


def assert_unchanged(lm, before):
    for name, p in lm.model.named_parameters():
        value, requires_grad, grad = before[name]
        assert torch.equal(p, value), name
        assert p.requires_grad == requires_grad and p.grad is grad, name


@pytest.mark.parametrize("loss", ["teacher_forced", "last_token"])
@pytest.mark.parametrize("eps", [None, 2e-4])
def test_independent_equals_a_plain_adam_loop(lm64, loss, eps):
    lm = lm64
    hp = hparams(loss=loss, norm_constraint=eps, skip_step_below=0.0, early_stop_below=0.0)
    results = FineTune(lm, hp).independent(lm, INDEXED[:2])
    for request, result in zip(REQUESTS[:2], results, strict=True):
        assert result.ok and result.steps == 3
        assert isinstance(result.update, editing.DenseUpdate) and result.update.layer == LAYER
        expected = plain_fine_tune(lm, [request], 3, hp.lr, eps, loss)
        torch.testing.assert_close(result.update.delta, expected, rtol=0, atol=ATOL)
        assert expected.abs().max() > 1e-4


def test_joint_trains_once_on_every_request(lm64):
    lm = lm64
    hp = hparams(skip_step_below=0.0, early_stop_below=0.0, batch_size=8)
    edit = FineTune(lm, hp).joint(lm, INDEXED)
    (update,) = edit.updates
    assert all(r.ok and r.update is None and r.steps == 3 for r in edit.results)
    expected = plain_fine_tune(lm, REQUESTS, 3, hp.lr)
    torch.testing.assert_close(update.delta, expected, rtol=0, atol=ATOL)
    # Two requests per step: 3 passes of 2 steps, a different (reference: epoch) schedule.
    chunked = FineTune(lm, hparams(skip_step_below=0.0, early_stop_below=0.0, batch_size=2))
    assert chunked.joint(lm, INDEXED).results[0].steps == 6


def test_the_reference_skip_and_early_stop(lm):
    never = FineTune(lm, hparams(skip_step_below=1e9)).independent(lm, INDEXED[:1])[0]
    assert never.steps == 0 and not never.update.delta.any()
    once = FineTune(lm, hparams(early_stop_below=1e9)).independent(lm, INDEXED[:1])[0]
    assert once.steps == 1


def test_the_l_infinity_box_holds_and_binds(lm):
    eps = 1e-4
    free = FineTune(lm, hparams(steps=5)).independent(lm, INDEXED[:1])[0].update.delta
    boxed = FineTune(lm, hparams(steps=5, norm_constraint=eps))
    assert boxed.name == "ft-l"
    (result,) = boxed.independent(lm, INDEXED[:1])
    joint = boxed.joint(lm, INDEXED).updates[0]
    weight = lm.mlp_out_weight(LAYER)
    rounding = torch.finfo(weight.dtype).eps * float(weight.abs().max())  # W − W0 of clamped W
    for delta in (result.update.delta, joint.delta):
        assert delta.abs().max() <= eps + rounding
    assert free.abs().max() > 2 * eps


def test_weights_restored_bit_for_bit_and_nothing_else_changes(lm):
    other = lm.module("final_norm").weight
    other.requires_grad_(True)  # a parameter someone else trains: FT must not touch its grad
    try:
        before = snapshot(lm)
        editor = FineTune(lm, hparams())
        editor.independent(lm, INDEXED)
        edit = editor.joint(lm, INDEXED)
        assert_unchanged(lm, before)
        with editing.preserved_weights(lm, editor.layers):
            editing.sequential.edit_sequentially(lm, REQUESTS, editor, batch_size=2)
            assert not torch.equal(lm.mlp_out_weight(LAYER), before_weight(lm, before))
        assert_unchanged(lm, before)
        assert edit.updates[0].delta.any()
    finally:
        other.requires_grad_(False)


def before_weight(lm, before):
    name = lm.path("mlp_out", LAYER) + ".weight"
    weight = before[name][0]
    return weight.T if lm.family.mlp_out_transposed else weight


def test_dense_updates_as_hooks_equal_the_weights_written_in_place(lm):
    results = FineTune(lm, hparams(steps=4)).independent(lm, INDEXED)
    updates = [results[0].update, None, results[2].update]
    hooked = score_cases(lm, CASES, updates)
    for case, update, scores in zip(CASES, updates, hooked, strict=True):
        with editing.edited(lm, [update] if update is not None else []):
            (alone,) = score_cases(lm, [case])
        for kind, pairs in alone.items():
            for (a_new, a_true), (b_new, b_true) in zip(scores[kind], pairs, strict=True):
                assert a_new == pytest.approx(b_new, rel=1e-5, abs=1e-6)
                assert a_true == pytest.approx(b_true, rel=1e-5, abs=1e-6)
    assert hooked[0]["rewrite"] != score_cases(lm, CASES[:1])[0]["rewrite"]


BAD = [
    EditRequest("Michel Rocard speaks", "Danielle Darrieux", "English", id="missing"),
    EditRequest(REQUESTS[0].prompt, REQUESTS[0].subject, "   ", id="empty"),
]


def test_bad_requests_get_the_same_errors_as_rome(lm):
    rome = Rome(lm, RomeHparams(layer=LAYER), second_moment=None, context_templates=["{}"])
    expected = [r.error for r in rome.independent(lm, list(enumerate(BAD)))]
    assert all(e is not None for e in expected)
    editor = FineTune(lm, hparams(steps=1))
    indexed = [(0, BAD[0]), (1, REQUESTS[0]), (2, BAD[1])]
    for results in (editor.independent(lm, indexed), editor.joint(lm, indexed).results):
        assert [r.ok for r in results] == [False, True, False]
        assert [str(r.error) for r in (results[0], results[2])] == [
            str(expected[0]),
            str(expected[1]).replace("request 1", "request 2"),
        ]


def config(*overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("evaluate", overrides=list(overrides))


@pytest.mark.parametrize(
    ("name", "model", "layer", "eps", "lr"),
    [
        ("ft", "gpt2-xl", 1, None, 5e-4),  # the reference's hparams/FT/*.json
        ("ft", "gpt-j-6b", 21, None, 5e-4),
        ("ft-l", "gpt2-xl", 0, 5e-4, 5e-4),
        ("ft-l", "gpt-j-6b", 0, 5e-5, 5e-4),
        ("ft", "smollm2-135m", 24, None, 3.86e-4),  # tuned (conf/tune/ft.yaml's study)
        ("ft-l", "smollm2-135m", 13, 7.16e-2, 4.73e-3),  # tuned (conf/tune/ft-l.yaml's study)
        ("ft-l", "tiny-llama", 1, 5e-4, 5e-4),
    ],
)
def test_presets(name, model, layer, eps, lr):
    cfg = config(f"editor={name}", f"model={model}")
    hp = editors.editor_hparams(cfg.editor, cfg.model.name)
    assert (hp.layer, hp.norm_constraint, hp.steps, hp.lr) == (layer, eps, 25, lr)
    assert hp == FtHparams(layer=layer, norm_constraint=eps, lr=lr)  # the rest: the defaults
    override = config(f"editor={name}", f"model={model}", "editor.layer=3", "editor.lr=0.1")
    assert (editors.editor_hparams(override.editor, model).layer, override.editor.lr) == (3, 0.1)


def test_the_stage_builds_ft_without_statistics_or_templates(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("FT needs no key statistics or context templates")

    monkeypatch.setattr(editors, "key_statistics", fail)
    monkeypatch.setattr(editors, "context_templates", fail)
    cfg = config("editor=ft-l", "model=tiny-gpt2", f"paths.cache={tmp_path}")
    lm = tiny_model("tiny-gpt2")
    case_editor = editors.CaseEditor(cfg, lm)
    assert isinstance(case_editor.editor, FineTune) and case_editor.editor.name == "ft-l"
    assert case_editor.editor.layers == (1,)
