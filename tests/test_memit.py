"""MEMIT, EMMET and AlphaEdit on the tiny models: each against a plain implementation of its
formula, EMMET with one request against ROME, the null space AlphaEdit preserves, mass edits as
hooks against weights written in place, exact restore, and the errors every editor shares."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch

from pipeline.core import editing
from pipeline.core.editing.alphaedit import AlphaEdit, AlphaEditHparams, null_space_projection
from pipeline.core.editing.emmet import Emmet, EmmetHparams
from pipeline.core.editing.keys import KeySolver
from pipeline.core.editing.memit import Memit, MemitHparams
from pipeline.core.editing.requests import EditRequest
from pipeline.core.editing.rome import Rome, RomeHparams
from pipeline.core.scoring import score_cases
from pipeline.core.second_moment import second_moment
from pipeline.core.tokens import encode, fill, subject_span
from pipeline.data.records import load_counterfact
from tests.conftest import ROOT, tiny_model

LAYERS = (0, 1)
TEMPLATES = ["{}", "The first thing. {}", "Because of that. {}"]
SAMPLE = ROOT / "data/samples/counterfact-edit_sample.json"
SAMPLES = json.loads(SAMPLE.read_text())
REQUESTS = [
    EditRequest.from_filled(r["prompt"], r["subject"], r["target_new"], id=r["case_id"])
    for r in SAMPLES[:3]
]
SMALL = dict(v_num_grad_steps=5, mom2_update_weight=2.0)  # λ small: visible edits on tiny models
# Comparisons of two ways to compute an update run on float64 models (`tiny`), with tolerances
# from the algebra. Where z is optimised on both sides: Adam's step lr·m̂/(√v̂ + ε) moves by up to
# lr/ε = 5e7 times a gradient's rounding, a whole step in float32 (no tolerance holds on every
# CPU), ≤ 5e7 · 1e-16 = 5e-9 in float64 (summands ≲ 1); 4 steps → ≤ 2e-8 in δ, whose largest
# entry is ≥ 2e-2 here (clamped to 0.75‖h‖), and R = (z − H)/layers left moves with it: ≤ 1e-6
# of ΔW's largest entry. Z_RTOL leaves a factor of 10 (measured ≤ 1e-13; a learning rate 1e-4
# off moves ΔW by 1.4e-4 to 8e-4 of it). Where only the spread differs: ΔW solves with
# λC + KKᵀ, whose condition number is ≤ 4e4 on these models, so keys read in other passes (~1e-16
# apart) give ΔW within ~1e-11; SOLVE_RTOL leaves a factor of 100 (measured ≤ 1.1e-12; λ 1e-6
# off moves ΔW by 1.3e-8 of it).
Z_RTOL, SOLVE_RTOL = 1e-5, 1e-9


@contextlib.contextmanager
def single_thread():
    """One torch thread: the tiny models run fastest so on the shared 2-core machine."""
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
    """A tiny model (GPT-2's transposed Conv1D, Llama's Linear) with C at both edited layers, in
    float64: nearly every test here compares two ways to compute an update (Z_RTOL, SOLVE_RTOL);
    tests/test_editors.py runs these editors on float32 models."""
    lm = tiny_model(request.param, dtype=torch.float64)
    texts = [r["prompt"] for r in SAMPLES] + [r["rephrase_prompt"] for r in SAMPLES]
    with single_thread():  # module fixtures start before `one_thread`; C is 10x faster so
        return lm, {layer: second_moment(lm, layer, texts, progress=False) for layer in LAYERS}


def assert_close_to(a: torch.Tensor, b: torch.Tensor, rtol: float) -> None:
    """max |a − b| within rtol of b's largest entry."""
    assert (a - b).abs().max() <= rtol * b.abs().max()


def memit(lm, moments, kind=Memit, hparams=MemitHparams, **overrides):
    hp = hparams(**{"layers": LAYERS, **SMALL, **overrides})
    return kind(lm, hp, second_moments=moments, context_templates=TEMPLATES)


def indexed(requests):
    return list(enumerate(requests))


def plain_key_and_state(lm, request, layer, z_layer):
    """Keys of every template at `layer` (group-averaged) and block z_layer's output at the bare
    prompt, by one hooked forward pass per row."""
    keys, state = [], None
    for t, template in enumerate(TEMPLATES):
        text = fill(template.replace("{}", request.prompt), request.subject)
        position = subject_span(lm.tokenizer, text, request.subject)[1] - 1
        seen = {}
        handles = [
            lm.module("mlp_out", layer).register_forward_pre_hook(
                lambda m, args, seen=seen: seen.__setitem__("key", args[0])
            ),
            lm.module("block", z_layer).register_forward_hook(
                lambda m, args, out, seen=seen: seen.__setitem__(
                    "state", out[0] if isinstance(out, tuple) else out
                )
            ),
        ]
        with torch.no_grad():
            lm.model(torch.tensor([encode(lm.tokenizer, text)]))
        for handle in handles:
            handle.remove()
        keys.append(seen["key"][0, position].double())
        if t == 0:
            state = seen["state"][0, position].double()
    return 0.5 * keys[0] + 0.5 * torch.stack(keys[1:]).mean(0), state


def test_memit_equals_a_plain_layer_loop(tiny):
    """Keys, states, the residual spread and ΔW = R Kᵀ (λC + K Kᵀ)⁻¹, layer after layer."""
    lm, moments = tiny
    editor = memit(lm, moments)
    prepared, _ = editor._prepare(lm, indexed(REQUESTS))
    z, *_ = editor.targets(lm, prepared)
    edit = editor.joint(lm, indexed(REQUESTS))
    expected = []
    with editing.preserved_weights(lm, LAYERS):
        for j, layer in enumerate(LAYERS):
            pairs = [plain_key_and_state(lm, r, layer, LAYERS[-1]) for r in REQUESTS]
            k = torch.stack([p[0] for p in pairs]).T  # (in, n)
            h = torch.stack([p[1] for p in pairs]).T  # (d, n)
            r = (z.T - h) / (len(LAYERS) - j)
            c = moments[layer].moment().double()
            delta = r @ k.T @ torch.linalg.inv(2.0 * c + k @ k.T)
            expected.append(delta)
            lm.mlp_out_weight(layer).data += delta
    assert [u.layer for u in edit.updates] == list(LAYERS)
    for update, delta in zip(edit.updates, expected, strict=True):
        got = update.matrix()
        assert_close_to(got, delta, SOLVE_RTOL)
        assert torch.linalg.matrix_rank(got, rtol=1e-4).item() == len(REQUESTS)


@pytest.mark.parametrize("conditioned", [True, False])
def test_memit_solve_equals_the_direct_formula_on_either_route(conditioned):
    """The Woodbury route (λC factored once) and the direct solve that a nearly singular C
    takes both give ΔW = R Kᵀ (λC + K Kᵀ)⁻¹: equal to the explicit inverse where C is well
    conditioned, and satisfying ΔW (λC + K Kᵀ) = R Kᵀ where it is not."""
    torch.manual_seed(0)
    lm = tiny_model("tiny-gpt2")
    out, width = lm.mlp_out_weight(1).shape
    x = torch.randn(width, 4 * width if conditioned else width // 2).double()
    c = x @ x.T / x.shape[1]
    if not conditioned:  # rank width / 2, made barely positive definite
        c = c + 1e-12 * torch.eye(width, dtype=c.dtype)
    editor = memit(lm, {1: c}, layers=(1,))
    assert (editor.c_inverse(1, torch.ones(1, width).double()) is None) is not conditioned
    keys, residuals = torch.randn(3, width).double(), torch.randn(3, out).double()
    got = editor.solve(1, keys, residuals).matrix()
    k = keys.T
    system = 2.0 * c + k @ k.T
    if conditioned:
        expected = residuals.T @ k.T @ torch.linalg.inv(system)
        torch.testing.assert_close(got, expected, rtol=1e-7, atol=1e-9)
    rhs = residuals.T @ k.T
    assert (got @ system - rhs).abs().max() <= 1e-8 * rhs.abs().max()


def test_memit_independent_spreads_in_shared_passes_as_each_request_alone(tiny):
    """Batched independent editing (per-row hooks for each request's lower layers) gives each
    request the update of the reference loop: that request alone, written into the weights."""
    lm, moments = tiny
    editor = memit(lm, moments)
    results = editor.independent(lm, indexed(REQUESTS))
    prepared, _ = editor._prepare(lm, indexed(REQUESTS))
    z, *_ = editor.targets(lm, prepared)
    for i, (p, result) in enumerate(zip(prepared, results, strict=True)):
        with editing.preserved_weights(lm, LAYERS):
            alone = editor.spread(lm, [p], z[i : i + 1])
        for got, expected in zip(result.update, alone, strict=True):
            assert_close_to(got.matrix(), expected.matrix(), SOLVE_RTOL)


def test_z_of_a_float64_model_is_optimised_in_float64(tiny):
    """The comparisons under Z_RTOL need it (`values.optimised_dtype`): with δ and the logits in
    float32 on a float64 model, updates computed two ways came up to 2.8e-6 apart (ROME's prefix
    reuse), float32 rounding that Adam amplified; 7e-14 in float64."""
    lm, moments = tiny
    editor = memit(lm, moments)
    prepared, _ = editor._prepare(lm, indexed(REQUESTS))
    *_, deltas, _ = editor.targets(lm, prepared)
    assert deltas.dtype == torch.float64
    assert not torch.equal(deltas, deltas.float().double())  # not float32 values widened


class DictStore:
    """A `ValueStore` in memory that counts what it was asked for and what it had."""

    def __init__(self):
        self.rows, self.hits, self.misses = {}, 0, 0

    def get(self, key):
        row = self.rows.get(key)
        self.hits += row is not None
        self.misses += row is None
        return row

    def put(self, rows):
        self.rows.update(rows)


def test_stored_z_is_reused_by_reruns_and_editors_and_missed_on_an_edited_model(tiny):
    lm, moments = tiny
    store = DictStore()
    first = memit(lm, moments)
    first.value_store = store
    a = first.independent(lm, indexed(REQUESTS))
    assert (store.hits, store.misses, len(store.rows)) == (0, 3, 3)
    again = memit(lm, moments)
    again.value_store = store
    b = again.independent(lm, indexed(REQUESTS))
    assert store.hits == 3
    assert [r.info["z_reused"] for r in a] == [False] * 3
    assert [r.info["z_reused"] for r in b] == [True] * 3
    for x, y in zip(a, b, strict=True):
        assert x.steps == y.steps and x.target_nll == y.target_nll
        assert all(
            torch.equal(u.matrix(), v.matrix()) for u, v in zip(x.update, y.update, strict=True)
        )
    chunked = memit(lm, moments)
    chunked.batch_size = 2  # z of 3 requests in two chunks: the same values up to rounding
    for x, y in zip(a, chunked.independent(lm, indexed(REQUESTS)), strict=True):
        assert x.steps == y.steps
        for u, v in zip(x.update, y.update, strict=True):
            assert_close_to(v.matrix(), u.matrix(), Z_RTOL)
    emmet = memit(lm, moments, Emmet, EmmetHparams, layers=(1,))  # z at the same layer
    emmet.value_store = store
    emmet.joint(lm, indexed(REQUESTS[:2]))
    assert store.hits == 5
    with editing.edited(lm, [a[0].update]):  # sequential editing: the model moved
        again.joint(lm, indexed(REQUESTS[:1]))
    assert store.misses == 4 and len(store.rows) == 4


def test_emmet_with_one_request_is_romes_update():
    """One request, any λ: ΔW = r (C⁻¹k)ᵀ / (kᵀC⁻¹k), ROME's rank-one algebra with the same key."""
    torch.manual_seed(0)
    lm = tiny_model("tiny-gpt2")
    texts = [r["prompt"] for r in SAMPLES]
    moments = {1: second_moment(lm, 1, texts, progress=False)}
    editor = memit(lm, moments, Emmet, EmmetHparams, layers=(1,), mom2_update_weight=7.0)
    out, width = lm.mlp_out_weight(1).shape
    key, residual = torch.randn(1, width).double(), torch.randn(1, out).double()
    emmet = editor.solve(1, key, residual).matrix()
    solver = KeySolver(moments[1], lm.device, update_weight=7.0)
    u = solver(key)
    romes = editing.RankOneUpdate(1, residual[0] / (u[0] @ key[0]), u[0]).matrix()
    torch.testing.assert_close(emmet, romes, rtol=1e-9, atol=1e-12)


def test_emmet_of_one_request_edits_as_r_rome_end_to_end():
    """With the norms out of the objective (they are measured at different sites), EMMET at one
    layer and r-ROME with v* on the averaged key optimise the same δ and write the same update.
    r-ROME without its ridge on λC (mom2_ridge 1e-6 of its mean diagonal, which moves ΔW by 5e-5
    of its largest entry on this model), as EMMET solves."""
    lm = tiny_model("tiny-gpt2", dtype=torch.float64)  # as Z_RTOL needs
    texts = [r["prompt"] for r in SAMPLES] + [r["rephrase_prompt"] for r in SAMPLES]
    moment = second_moment(lm, 1, texts, progress=False)
    free = dict(v_num_grad_steps=5, v_weight_decay=0.0, clamp_norm_factor=1e6)
    emmet = memit(
        lm, {1: moment}, Emmet, EmmetHparams, layers=(1,), key_average="templates", **free
    )
    r_rome = Rome(
        lm,
        RomeHparams(layer=1, consistent_keys=True, value_from="mean", mom2_ridge=0.0, **free),
        second_moment=moment,
        context_templates=TEMPLATES,
    )
    (a,) = emmet.independent(lm, indexed(REQUESTS[:1]))
    (b,) = r_rome.independent(lm, indexed(REQUESTS[:1]))
    assert a.steps == b.steps
    assert_close_to(a.update[0].matrix(), b.update.matrix(), Z_RTOL)


def test_alphaedit_equals_its_formula_and_spares_the_preserved_keys(tiny):
    lm, moments = tiny
    c = moments[1].moment().double()
    values, vectors = torch.linalg.eigh(c)
    threshold = float(values.median())  # half the directions preserved (tiny models' C is small)
    editor = memit(lm, moments, AlphaEdit, AlphaEditHparams, nullspace_threshold=threshold)
    p = null_space_projection(c, threshold)
    torch.testing.assert_close(p @ p, p, atol=1e-8, rtol=0)
    out = lm.mlp_out_weight(1).shape[0]
    keys, residuals = torch.randn(3, c.shape[0]).double(), torch.randn(3, out).double()
    got = editor.solve(1, keys, residuals).matrix()
    # The paper's form: ΔW = R Kᵀ P (K Kᵀ P + α I)⁻¹ with α = l2.
    k = keys.T
    paper = (
        residuals.T @ k.T @ p @ torch.linalg.inv(k @ k.T @ p + 10.0 * torch.eye(len(c)).double())
    )
    torch.testing.assert_close(got, paper, rtol=1e-6, atol=1e-9)
    kept = vectors[:, values > threshold]  # directions the corpus' keys use
    assert kept.shape[1] > 0
    assert (got @ kept).abs().max() < 1e-8 * got.abs().max()


def test_alphaedit_remembers_the_keys_of_committed_batches(tiny):
    lm, moments = tiny
    editor = memit(lm, moments, AlphaEdit, AlphaEditHparams)
    with editing.preserved_weights(lm, LAYERS):
        first = editor.joint(lm, indexed(REQUESTS[:1]))
        editing.apply_update(lm, first.updates)
        editor.commit(lm, first)
        assert all(g.abs().max() > 0 for g in editor.preserved.values())
        again = editor.joint(lm, indexed(REQUESTS[:1]))
    fresh = memit(lm, moments, AlphaEdit, AlphaEditHparams).joint(lm, indexed(REQUESTS[:1]))
    assert not torch.allclose(again.updates[0].matrix(), fresh.updates[0].matrix())


@pytest.mark.parametrize("kind", [Memit, Emmet, AlphaEdit])
def test_mass_updates_as_hooks_equal_the_weights_written_in_place(tiny, kind):
    lm, moments = tiny
    hparams = {Memit: MemitHparams, Emmet: EmmetHparams, AlphaEdit: AlphaEditHparams}[kind]
    # The tiny models' keys are small: a ridge of 10 (AlphaEdit's α) would leave no visible edit.
    editor = memit(lm, moments, kind, hparams, **({"l2": 1e-3} if kind is AlphaEdit else {}))
    cases = load_counterfact(SAMPLE, limit=3).records
    requests = [EditRequest(c.template, c.subject, c.target_new, id=c.id) for c in cases]
    original = {layer: lm.mlp_out_weight(layer).detach().clone() for layer in LAYERS}
    edit = editor.joint(lm, indexed(requests))
    assert all(torch.equal(lm.mlp_out_weight(layer), w) for layer, w in original.items())
    hooked = score_cases(lm, cases, [edit.updates] * len(cases))
    with editing.edited(lm, [edit.updates]):
        written = score_cases(lm, cases)
    plain = score_cases(lm, cases)
    assert all(torch.equal(lm.mlp_out_weight(layer), w) for layer, w in original.items())
    moved = False
    for h, w, p in zip(hooked, written, plain, strict=True):
        for kind_ in h:
            a, b = torch.tensor(h[kind_]), torch.tensor(w[kind_])
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
            moved |= not torch.allclose(a, torch.tensor(p[kind_]), atol=1e-6)
    assert moved


def test_independent_edits_are_each_requests_own_and_restore_the_weights(tiny):
    lm, moments = tiny
    editor = memit(lm, moments)
    original = {layer: lm.mlp_out_weight(layer).detach().clone() for layer in LAYERS}
    together = editor.independent(lm, indexed(REQUESTS))
    alone = editor.independent(lm, indexed(REQUESTS[1:2]))
    assert all(torch.equal(lm.mlp_out_weight(layer), w) for layer, w in original.items())
    assert [len(r.update) for r in together] == [2, 2, 2]
    for a, b in zip(together[1].update, alone[0].update, strict=True):
        assert_close_to(a.matrix(), b.matrix(), Z_RTOL)


def test_every_editor_refuses_the_same_malformed_requests(tiny):
    lm, moments = tiny
    bad = [
        EditRequest("{} is in", "Paris", "France"),  # fine
        EditRequest("The city is in", "Paris", "France"),  # no subject
        EditRequest("{} is in", "Paris", ""),  # empty target
    ]
    editors = [
        memit(lm, moments),
        memit(lm, moments, Emmet, EmmetHparams, layers=(1,)),
        memit(lm, moments, AlphaEdit, AlphaEditHparams),
        Rome(
            lm,
            RomeHparams(layer=1, v_num_grad_steps=2),
            second_moment=moments[1],
            context_templates=TEMPLATES,
        ),
    ]
    reasons = []
    for editor in editors:
        results = editor.independent(lm, indexed(bad))
        joint = editor.joint(lm, indexed(bad)).results
        assert [r.ok for r in results] == [r.ok for r in joint] == [True, False, False]
        reasons.append([str(r.error) for r in results[1:]])
    assert all(r == reasons[0] for r in reasons), reasons
