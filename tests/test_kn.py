"""KN: integrated-gradients scores against an explicit loop over α, the edit's column changes,
exact restore, rank-one updates as hooks, and bad requests."""

from __future__ import annotations

import pytest
import torch
from hydra import compose, initialize_config_dir

from pipeline.app import editors
from pipeline.core import editing
from pipeline.core.editing.kn import KnHparams, KnowledgeNeurons, neuron_scores
from pipeline.core.editing.requests import EditRequest
from pipeline.core.editing.rome import Rome, RomeHparams
from pipeline.core.scoring import score_cases
from pipeline.core.tokens import encode, target_ids
from pipeline.data.records import load_counterfact
from tests.conftest import ROOT, tiny_model

CASES = load_counterfact(ROOT / "data/samples/counterfact-edit_sample.json", limit=3).records
REQUESTS = [
    EditRequest(c.template, c.subject, c.target_new, target_true=c.target_true, id=c.id)
    for c in CASES
]
INDEXED = list(enumerate(REQUESTS))


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=["tiny-gpt2", "tiny-llama"])
def lm(request):
    return tiny_model(request.param)


def hparams(**overrides) -> KnHparams:
    return KnHparams(
        **{"steps": 5, "batch_size": 7, "reject_already_predicted": False, **overrides}
    )


def site(lm, layer, neurons):
    mlp = lm.module("mlp", layer)
    if neurons == "key":
        return lm.module("mlp_out", layer)
    return mlp.act if hasattr(mlp, "act") else mlp.act_fn  # GPT-2's / Llama's activation


def plain_scores(lm, prompt, answer, layer, steps, neurons="key"):
    """The formula for one layer: one forward pass per α, one row each."""
    module = site(lm, layer, neurons)
    ids = torch.tensor([prompt])
    box = []
    handle = module.register_forward_pre_hook(lambda m, args: box.append(args[0][0, -1].detach()))
    with torch.no_grad():
        lm.model(ids)
    handle.remove()
    a = box[0]
    total = torch.zeros_like(a)
    for alpha in torch.linspace(0, 1, steps):
        x = (alpha * a).requires_grad_(True)

        def put(m, args, x=x):
            inputs = args[0].clone()
            inputs[0, -1] = x
            return (inputs,)

        handle = module.register_forward_pre_hook(put)
        probs = lm.model(ids).logits[0, -1].softmax(-1)
        handle.remove()
        (grad,) = torch.autograd.grad(torch.stack([probs[t] for t in answer]).mean(), [x])
        total += grad
    return a * total / steps


@pytest.mark.parametrize("neurons", ["key", "pre_activation"])
def test_scores_equal_an_explicit_loop_over_alphas(lm, neurons):
    request = REQUESTS[0]
    prompt = encode(lm.tokenizer, request.filled)
    answer = target_ids(lm.tokenizer, request.target_true, request.filled)[:1]
    scores, top = neuron_scores(lm, prompt, answer, hparams(neurons=neurons))
    assert scores.shape[0] == lm.n_layers
    for layer in (0, lm.n_layers - 1):  # rows of both packed with other layers' (batch_size 7)
        expected = plain_scores(lm, prompt, answer, layer, 5, neurons)
        torch.testing.assert_close(
            scores[layer], expected, rtol=1e-4, atol=1e-5 * expected.abs().max()
        )
    with torch.no_grad():
        assert top == int(lm.model(torch.tensor([prompt])).logits[0, -1].argmax())


def test_all_answer_tokens_average_the_scores_of_each(lm):
    request = REQUESTS[0]
    prompt = encode(lm.tokenizer, request.filled)
    answer = [5, 17, 301]  # any three tokens, each read at the last prompt position
    hp = hparams()
    together, _ = neuron_scores(lm, prompt, answer, hp)
    each = torch.stack([neuron_scores(lm, prompt, [t], hp)[0] for t in answer]).mean(0)
    torch.testing.assert_close(together, each, rtol=1e-4, atol=1e-6 * each.abs().max())


@pytest.mark.parametrize("leading_space", [True, False])
def test_the_edit_moves_each_selected_column_by_one_vector(lm, leading_space):
    hp = hparams(leading_space=leading_space)
    request = REQUESTS[1]
    (result,) = KnowledgeNeurons(lm, hp).independent(lm, [(0, request)])
    assert result.ok
    if leading_space:
        true = target_ids(lm.tokenizer, request.target_true, request.filled)
        new = target_ids(lm.tokenizer, request.target_new, request.filled)
    else:
        true = lm.tokenizer(request.target_true, add_special_tokens=False)["input_ids"]
        new = lm.tokenizer(request.target_new, add_special_tokens=False)["input_ids"]
    prompt = encode(lm.tokenizer, request.filled)
    scores = torch.stack(
        [plain_scores(lm, prompt, true[:1], layer, hp.steps) for layer in range(lm.n_layers)]
    )
    selected = scores > 0.2 * scores.max()
    embeddings = lm.module("unembed").weight
    v = embeddings[new].sum(0) - 2 * embeddings[result.info["top_token"]]
    assert result.info["neurons"] == int(selected.sum()) > 0
    for layer in range(lm.n_layers):
        before = lm.mlp_out_weight(layer).detach().clone()
        with editing.edited(lm, [result.update]):
            change = lm.mlp_out_weight(layer).detach() - before
        for column in range(change.shape[1]):
            expected = v if selected[layer, column] else torch.zeros_like(v)
            torch.testing.assert_close(change[:, column], expected, rtol=1e-5, atol=1e-6)


def test_weights_restored_bit_for_bit_and_updates_as_hooks_equal_the_weights(lm):
    before = {name: p.detach().clone() for name, p in lm.model.named_parameters()}
    editor = KnowledgeNeurons(lm, hparams())
    results = editor.independent(lm, INDEXED)
    edit = editor.joint(lm, INDEXED)  # one request after another, each on the model so far
    assert all(r.ok for r in results) and len(edit.updates) >= len(results[0].update)
    for name, p in lm.model.named_parameters():
        assert torch.equal(p, before[name]), name
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


def test_bad_requests_get_the_same_errors_as_rome(lm):
    bad = [
        EditRequest("Michel Rocard speaks", "Danielle Darrieux", "English", "French", id="missing"),
        EditRequest(REQUESTS[0].prompt, REQUESTS[0].subject, "   ", "French", id="empty"),
    ]
    rome = Rome(lm, RomeHparams(layer=1), second_moment=None, context_templates=["{}"])
    expected = [str(r.error) for r in rome.independent(lm, list(enumerate(bad)))]
    no_truth = EditRequest(REQUESTS[0].prompt, REQUESTS[0].subject, "English", id="no-truth")
    editor = KnowledgeNeurons(lm, hparams())
    results = editor.independent(lm, [(0, bad[0]), (1, bad[1]), (2, no_truth), (3, REQUESTS[0])])
    assert [r.ok for r in results] == [False, False, False, True]
    assert [str(r.error) for r in results[:2]] == expected
    assert "target_true" in results[2].error.reason


def config(*overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("evaluate", overrides=list(overrides))


def test_kn_has_no_layer_and_the_stage_builds_it_without_statistics(tmp_path, monkeypatch):
    cfg = config("editor=kn", "model=gpt2-xl")
    hp = editors.editor_hparams(cfg.editor, cfg.model.name)
    assert hp == KnHparams(batch_size=hp.batch_size)  # the YAML holds the defaults
    assert (hp.steps, hp.adaptive_threshold) == (20, 0.2)
    with pytest.raises(ValueError, match="every layer"):
        editors.editor_hparams(config("editor=kn", "editor.layer=3").editor, "gpt2-xl")
    with pytest.raises(ValueError, match="no edit layer"):
        editors.edit_layers(cfg.editor, "gpt2-xl")

    def fail(*args, **kwargs):
        raise AssertionError("KN needs no key statistics or context templates")

    monkeypatch.setattr(editors, "key_statistics", fail)
    monkeypatch.setattr(editors, "context_templates", fail)
    tiny = config("editor=kn", "model=tiny-neox", f"paths.cache={tmp_path}")
    lm = tiny_model("tiny-neox")
    case_editor = editors.CaseEditor(tiny, lm)
    assert isinstance(case_editor.editor, KnowledgeNeurons)
    assert case_editor.editor.layers == tuple(range(lm.n_layers))


def test_rows_on_the_clean_prefix_score_as_whole_prompts(lm):
    request = REQUESTS[1]
    prompt = encode(lm.tokenizer, request.filled)
    answer = target_ids(lm.tokenizer, request.target_true, request.filled)
    cached, top = neuron_scores(lm, prompt, answer, hparams(answer_tokens="all"))
    whole, top_whole = neuron_scores(
        lm, prompt, answer, hparams(answer_tokens="all", reuse_prefix=False)
    )
    assert top == top_whole and len(prompt) > 2
    torch.testing.assert_close(cached, whole, rtol=1e-4, atol=1e-6 * whole.abs().max())
