"""The contract every entry of the editor registry (`pipeline.app.editors.EDITORS`) keeps, so
that a new editor is one module, one entry and one yaml, and the protocols written once in
`pipeline.app.protocols` hold for it:

- each protocol (independent, mass, sequential) leaves the weights bit-identical once it is done;
- a joint edit of one request writes what the independent edit of that request writes;
- the same bad requests are refused with the same reason, alone or in a joint edit;
- `editor.layers` covers every weight an edit changes (`preserved_weights` restores only those);
- `state_dict` and `load_state_dict` round-trip the state a sequential run resumes from.

On the random tiny-gpt2 (4 layers), with few optimisation steps: what is checked is the
plumbing every editor shares, not whether it edits well.
"""

from __future__ import annotations

import pytest
import torch
from hydra import compose, initialize_config_dir

from pipeline.app import editors
from pipeline.core.editing.requests import EditRequest
from pipeline.core.editing.updates import apply_update, preserved_weights
from pipeline.data.records import load_counterfact
from tests.conftest import ROOT, tiny_model

NAMES = sorted(editors.EDITORS)
CASES = load_counterfact(ROOT / "data/samples/counterfact-edit_sample.json", limit=3).records
# The same malformed requests every editor must refuse, through `requests.prepare`.
BAD = [
    EditRequest("{} is located in", "", "Paris", id="empty subject"),
    EditRequest("Paris is located in", "Paris", " France", id="no placeholder"),
    EditRequest("{} is located in", "Paris", "", id="empty target"),
]


@pytest.fixture(scope="module")
def lm():
    return tiny_model("tiny-gpt2")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")  # statistics shared by the editors of this module


BUILT: dict[str, editors.CaseEditor] = {}


def shared_editor(name: str, lm, cache) -> editors.CaseEditor:
    """One editor per registry entry for the tests that leave its state as it was."""
    if name not in BUILT:
        BUILT[name] = case_editor(name, lm, cache)
    return BUILT[name]


def case_editor(name: str, lm, cache) -> editors.CaseEditor:
    """The registry entry `name` built from its own yaml, cheaply: short optimisation, one
    context template, statistics of a few thousand tokens of the bundled sample."""
    settings = {
        "v_num_grad_steps": 3,
        "context_templates": "[[3,1]]",
        "steps": 3,  # FT and KN
    }
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        probe = compose("evaluate", overrides=["model=tiny-gpt2", f"editor={name}"])
        overrides = [
            f"editor.{k}={v}" for k, v in settings.items() if probe.editor.get(k) is not None
        ]
        if probe.editor.get("mom2") is not None:
            overrides.append("editor.mom2.max_tokens=3000")
        cfg = compose(
            "evaluate",
            overrides=[
                "model=tiny-gpt2",
                f"editor={name}",
                f"paths.cache={cache}",
                "corpus.source=sample",
                *overrides,
            ],
        )
    built = editors.CaseEditor(cfg, lm)
    if hasattr(built.editor, "value_store"):
        built.editor.value_store = None  # every edit computes its own values here
    return built


def weights(lm) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in lm.model.state_dict().items()}


def assert_same(lm, before: dict[str, torch.Tensor], what: str) -> None:
    changed = [k for k, v in lm.model.state_dict().items() if not torch.equal(v, before[k])]
    assert not changed, f"{what} left {changed} changed"


def changed_layers(lm, before: dict[str, torch.Tensor]) -> set[int]:
    """The layers whose MLP output projection differs from `before`; any other changed weight
    fails the test (an edit writes MLP output projections only)."""
    projections = {layer: lm.mlp_out_weight(layer).data_ptr() for layer in range(lm.n_layers)}
    layers, others = set(), []
    for name, value in lm.model.state_dict().items():
        if torch.equal(value, before[name]):
            continue
        found = [layer for layer, ptr in projections.items() if value.data_ptr() == ptr]
        (layers.update(found) if found else others.append(name))
    assert not others, f"an edit changed {others}, which are no MLP output projection"
    return layers


@pytest.mark.parametrize("name", NAMES)
def test_every_protocol_restores_the_weights_bit_for_bit(name, lm, cache):
    editor = shared_editor(name, lm, cache)
    before = weights(lm)
    editor.updates(CASES)
    assert_same(lm, before, "the independent edits")
    editor.mass(CASES)
    assert_same(lm, before, "the joint edit")
    editor.edit_sequentially(CASES, lambda done, results: None, batch_size=2)
    assert_same(lm, before, "sequential editing")


@pytest.mark.parametrize("name", NAMES)
def test_a_joint_edit_of_one_request_is_its_independent_edit(name, lm, cache):
    """Both paths run the same algebra on one request: the same weights after either update,
    to float32 rounding of the two orders of summation (a joint solve sums over one key)."""
    editor = shared_editor(name, lm, cache)
    (alone,) = editor.updates(CASES[:1])
    joint = editor.mass(CASES[:1])
    assert alone.ok == joint.results[0].ok
    with preserved_weights(lm, editor.editor.layers):
        apply_update(lm, alone.update)
        independent = {layer: lm.mlp_out_weight(layer).clone() for layer in editor.editor.layers}
    with preserved_weights(lm, editor.editor.layers):
        apply_update(lm, joint.updates)
        for layer, weight in independent.items():
            torch.testing.assert_close(lm.mlp_out_weight(layer), weight, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_the_same_bad_requests_are_refused_with_the_same_reason(name, lm, cache):
    editor = shared_editor(name, lm, cache).editor
    good = editors.CaseEditor.requests(CASES[:1])
    indexed = list(enumerate([*BAD, *good]))
    alone = editor.independent(lm, indexed)
    joint = editor.joint(lm, indexed).results
    for request, one, many in zip(BAD, alone, joint, strict=False):
        assert one.error is not None and many.error is not None, request.id
        assert str(one.error) == str(many.error), request.id
    reasons = [r.error.reason for r in alone[: len(BAD)]]
    assert "empty" in reasons[0] and "has no '{}'" in reasons[1] and "target is empty" in reasons[2]
    assert alone[-1].ok == joint[-1].ok  # the good request alike in both


@pytest.mark.parametrize("name", NAMES)
def test_the_editors_layers_cover_every_weight_an_edit_changes(name, lm, cache):
    editor = shared_editor(name, lm, cache)
    declared = {layer % lm.n_layers for layer in editor.editor.layers}
    before = weights(lm)
    results = editor.updates(CASES)
    edit = editor.mass(CASES)
    for updates in [*(r.update for r in results if r.ok), edit.updates]:
        with preserved_weights(lm, editor.editor.layers):
            apply_update(lm, updates)
            assert changed_layers(lm, before) <= declared
    assert_same(lm, before, "applying the updates inside preserved_weights")


@pytest.mark.parametrize("name", NAMES)
def test_the_state_dict_round_trips(name, lm, cache):
    """The state after a sequential run, loaded into a fresh editor, is the same state, and
    the next edit from it is the same edit."""
    first = case_editor(name, lm, cache)
    with preserved_weights(lm, first.editor.layers):
        edited_weights = {}

        def keep(done, results):
            edited_weights.update(first.snapshot(done)["weights"])

        first.edit_sequentially(CASES[:2], keep, batch_size=1)
        state = first.editor.state_dict()
        second = case_editor(name, lm, cache)
        second.editor.load_state_dict(state)
        assert_equal_states(second.editor.state_dict(), state)
        with torch.no_grad():
            for layer, weight in edited_weights.items():
                lm.mlp_out_weight(layer).copy_(weight)
        again = [first.mass(CASES[2:]).updates, second.mass(CASES[2:]).updates]
    for one, other in zip(*again, strict=True):
        for a, b in zip(vars(one).values(), vars(other).values(), strict=True):
            assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


def assert_equal_states(a, b) -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_equal_states(a[key], b[key])
    else:
        assert a == b
