"""The attribution engine (pipeline.core.patching.attribution): its grid cells are the first-order
terms of the exact restorations, computed here by central finite differences; they converge
to the exact engine's as the noise shrinks; window cells are sums of one-layer cells."""

import json

import pytest
import torch

from pipeline.app.findings import read_results
from pipeline.core.hooks import forward_hooks, main_output
from pipeline.core.patching import (
    AttributionTracer,
    Readout,
    resolve_noise,
    trace_all_kinds,
    trace_severed,
)
from pipeline.core.patching.attribution import MODULES
from pipeline.core.patching.common import corrupt_embeddings
from pipeline.core.tokens import encode, subject_span
from tests.conftest import tiny_model
from tests.test_stages import run_stage

PROMPT, SUBJECT = "The mother tongue of Danielle Darrieux is", "Danielle Darrieux"


@pytest.fixture(scope="module", params=["tiny-llama", "tiny-gpt2"])
def fact(request):
    """A float64 tiny model, the prompt's ids and subject span."""
    lm = tiny_model(request.param, dtype=torch.float64)
    ids = encode(lm.tokenizer, PROMPT)
    return lm, ids, subject_span(lm.tokenizer, PROMPT, SUBJECT)


def derivative_along_restoration(lm, tracer, kind, layer, token):
    """d P(answer) / d alpha at alpha = 0, per copy, where `kind` at (`token`, `layer`) is set
    to corrupted + alpha (clean - corrupted): by autograd through alpha alone, in a plain
    forward pass of the model (full logits, the state replaced by a hook), none of the
    engine's recording or read-out code."""
    alpha = torch.zeros((), dtype=torch.float64, requires_grad=True)
    clean = tracer.clean_states[kind][layer][0, token]

    def move(module, inputs, output):
        hidden = main_output(output)
        moved = hidden.clone()
        moved[:, token] = hidden[:, token] + alpha * (clean - hidden[:, token])
        return (moved, *output[1:]) if isinstance(output, tuple) else moved

    rows = torch.tensor([tracer.readout.sequence] * tracer.noise.shape[0])
    noising = corrupt_embeddings(lm, tracer.span, tracer.noise, 0)
    with noising, forward_hooks([(lm.module(MODULES[kind], layer), move)]):
        logits = lm.model(input_ids=rows, use_cache=False).logits
    position, target = tracer.readout.positions[0], tracer.readout.targets[0]
    p = logits[:, position].log_softmax(-1)[:, target].exp()
    return torch.stack(
        [torch.autograd.grad(p[s], alpha, retain_graph=True)[0] for s in range(len(p))]
    )


@pytest.mark.parametrize("kind", ["hidden", "mlp", "attn"])
def test_each_cell_is_the_derivative_along_the_restoration(fact, kind):
    """estimate - corrupted = mean over copies of d p / d alpha at alpha = 0. The models
    compute parts in float32 (RMSNorm, the read-out), so both sides carry ~1e-7 relative
    rounding of p, about 1e-4 of a cell's effect here (p ~ 5e-4, effect ~ 1e-6)."""
    lm, ids, span = fact
    noise = resolve_noise(lm, ids, span, samples=2, scale=0.05).double()
    tracer = AttributionTracer(lm, Readout.build(ids, [5]), span, noise)
    grid = tracer.grid(kind, window=1)
    for token, layer in [(span[1] - 1, 0), (span[0], 1), (len(ids) - 1, 1)]:
        derivative = derivative_along_restoration(lm, tracer, kind, layer, token).mean().item()
        assert grid[token, layer].item() - tracer.corrupted == pytest.approx(
            derivative, rel=1e-3, abs=1e-10
        )


def test_a_window_cell_is_the_sum_of_its_layers_cells(fact):
    """The first-order effects of the window's layers add (a departure from the joint
    restoration, named in the module). The grids hold p + effect in float32: one ulp at
    p ~ 5e-4 is 6e-11, and the sum adds three rounded cells, so atol 5e-10."""
    lm, ids, span = fact
    noise = resolve_noise(lm, ids, span, samples=3, scale=0.05).double()
    tracer = AttributionTracer(lm, Readout.build(ids, [5]), span, noise)
    one = tracer.grid("mlp", window=1) - tracer.corrupted
    three = tracer.grid("mlp", window=3) - tracer.corrupted
    L = lm.n_layers
    for layer in range(L):
        below, above = max(0, layer - 1), min(L, layer + 2)
        expected = one[:, below:above].sum(-1)
        assert torch.allclose(three[:, layer], expected, rtol=0, atol=5e-10)


def estimate_error(lm, ids, span, scale, linearize="prob"):
    """The largest |estimate - exact| over every cell of every kind (one-layer windows, where
    the estimate is the restoration's own first-order term) and the severed paths."""
    options = dict(samples=2, scale=scale, window=1)
    exact = trace_all_kinds(lm, ids, span, [5], **options)
    estimate = trace_all_kinds(
        lm, ids, span, [5], **options, engine="attribution", linearize=linearize
    )
    errors = [(exact[k].restored - estimate[k].restored).abs().max() for k in exact]
    severed = [
        trace_severed(lm, ids, span, [5], samples=2, scale=scale, engine=engine)
        for engine in ("fast", "attribution")
    ]
    errors += [
        (severed[0].restored[n] - severed[1].restored[n]).abs().max() for n in severed[0].restored
    ]
    return max(e.item() for e in errors), exact


@pytest.mark.parametrize("linearize", ["prob", "logprob"])
def test_the_estimate_converges_to_the_exact_trace_at_second_order(fact, linearize):
    """Halving the noise halves every restoration's step z* - z_s, so the error of a
    first-order estimate falls by 4 (1/4 + higher orders; a first-order mistake would give
    1/2). Scales where that dominates the float32 read-out's ~1e-10."""
    lm, ids, span = fact
    coarse, exact = estimate_error(lm, ids, span, 4e-3, linearize)
    fine, _ = estimate_error(lm, ids, span, 2e-3, linearize)
    assert fine < 0.32 * coarse
    assert coarse < 0.2 * max(exact[k].effect.abs().max().item() for k in exact)


def test_cells_before_the_subject_are_the_corrupted_probability_exactly(fact):
    """As in the exact engines: the noise does not reach them, restoring them is no change."""
    lm, ids, span = fact
    results = trace_all_kinds(lm, ids, span, [5], samples=3, engine="attribution")
    for result in results.values():
        assert span[0] > 0 and (result.restored[: span[0]] == result.corrupted).all()
        assert result.clean > 0 and result.restored[span[0] :].ne(result.corrupted).any()


def test_logprob_estimates_are_probabilities_and_bad_settings_are_named(fact):
    lm, ids, span = fact
    big = trace_all_kinds(
        lm, ids, span, [5], samples=3, scale=5.0, engine="attribution", linearize="logprob"
    )
    assert all(((r.restored >= 0) & (r.restored <= 1)).all() for r in big.values())
    with pytest.raises(ValueError, match="linearize must be one of"):
        trace_all_kinds(lm, ids, span, [5], engine="attribution", linearize="logit")


def test_the_trace_stage_writes_estimates_marked_as_such(tmp_path):
    """`trace.engine=attribution` end to end: the same files as the exact engine, each marked;
    the figures and the report's readings say "estimate"."""
    tiny = ["model=tiny-gpt2", "trace.facts=all", "data.limit=6", "trace.limit=3"]
    done = run_stage(
        "trace", *tiny, "trace.samples=3", "trace.engine=attribution", f"paths.results={tmp_path}"
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out_dir = tmp_path / "trace/tiny-gpt2/known_1000"
    prompts = [json.loads(p.read_text()) for p in sorted((out_dir / "prompts").glob("*.json"))]
    assert len(prompts) == 3 and all(p["estimate"] for p in prompts)
    assert {"hidden", "mlp", "attn"} <= set(prompts[0]["kinds"]) and "severed" in prompts[0]
    averages = json.loads((out_dir / "averages.json").read_text())
    summary = json.loads((out_dir / "summary.json").read_text())
    assert averages["estimate"] and summary["estimate"] and summary["engine"] == "attribution"
    assert (out_dir / "figures" / "average_mlp.png").exists()
    readings = read_results(averages, [], [], {})
    assert readings and all(f.evidence.startswith("ESTIMATED") for f in readings)

    refused = run_stage("trace", *tiny, "trace.engine=atp", f"paths.results={tmp_path / 'x'}")
    assert refused.returncode != 0 and "trace.engine='atp' is not allowed" in refused.stderr


def test_exact_traces_are_not_marked(tmp_path):
    """The marker follows the engine: the exact files say estimate false, the readings do not."""
    averages = {"kinds": {}, "estimate": False}
    assert read_results(averages, [], [], {}) == read_results({"kinds": {}}, [], [], {})
