"""What the figures draw: a zero-centred named scale, empty buckets missing, honest axes."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.app import figures
from pipeline.trace import aggregate
from tests.test_report import KINDS, LAYERS, trace_record


@pytest.fixture
def captured(monkeypatch):
    """The matplotlib figures the functions would save, kept open to inspect."""
    kept = []

    def keep(fig, out_dir, name):
        kept.append(fig)
        return out_dir / f"{name}.png"

    monkeypatch.setattr(figures, "_save", keep)
    return kept


def averages(pooling="prompt"):
    rng = np.random.default_rng(0)
    records = [trace_record(rng, i) for i in range(4)]  # 5 tokens: no middle, no further token
    records[0]["kinds"]["attn"][4][0] = -0.9  # a negative effect somewhere
    return aggregate(records, list(KINDS), pooling)


def test_average_heatmap_scale_is_centred_at_zero_and_named(tmp_path, captured):
    figures.average_heatmap(tmp_path, averages(), "attn", "m")
    ax, bar_ax = captured[0].axes
    mesh = ax.collections[0]
    assert mesh.norm.vmin == -mesh.norm.vmax  # zero sits in the middle of the scale
    assert mesh.cmap(0.5)[:3] == pytest.approx((1.0, 1.0, 1.0), abs=0.01)  # zero is white
    assert "indirect effect" in bar_ax.get_ylabel() and "0 = white" in bar_ax.get_ylabel()
    assert ax.get_xlabel() == "centre of a 2-layer window"  # the fixture's window
    assert "one sample per prompt" in ax.get_title()


def test_empty_buckets_are_missing_and_say_n_0(tmp_path, captured):
    figures.average_heatmap(tmp_path, averages(), "mlp", "m")
    ax = captured[0].axes[0]
    values = ax.collections[0].get_array().reshape(6, LAYERS)
    assert values.mask[1].all() and values.mask[4].all()  # middle subject, further: not drawn
    assert not values.mask[2].any()  # last subject token: drawn
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels[1] == "middle subject tokens (n=0): none, not drawn"
    assert labels[2] == "last subject token (n=4)"


def test_hidden_heatmap_says_layer_and_lines_say_window(tmp_path, captured):
    figures.average_heatmap(tmp_path, averages(), "hidden", "m")
    figures.last_subject_lines(tmp_path, averages(), "m")
    assert captured[0].axes[0].get_xlabel() == "layer"
    assert "centre of a 2-layer window" in captured[1].axes[0].get_xlabel()


def test_paper_pooling_is_said_in_the_figure(tmp_path, captured):
    both = averages()
    paper = figures.pooled(both, "paper")
    assert paper["kinds"] == both["poolings"]["paper"] and paper["pooling"] == "paper"
    figures.average_heatmap(tmp_path, paper, "mlp", "m")
    assert "paper's notebook" in captured[0].axes[0].get_title()
    assert "token rows" in captured[0].axes[0].get_title()
    with pytest.raises(ValueError, match="pooling"):
        figures.pooled({"kinds": {}, "pooling": "prompt"}, "paper")  # an older averages.json


def test_severed_bars_have_intervals(tmp_path, captured):
    figures.severed_bars(tmp_path, averages(), "m")
    ax = captured[0].axes[0]
    error_bars = [c for c in ax.containers if getattr(c, "errorbar", None) is not None]
    assert len(error_bars) == 3
    assert all(len(c.errorbar.lines[2][0].get_segments()) == LAYERS for c in error_bars)


def test_layer_sweep_series_stay_apart_with_integer_ticks(tmp_path, captured):
    metric = {"mean": 100.0, "low": 56.6, "high": 100.0, "n": 5}
    rows = [{"layer": layer, "n": 5, "post": dict.fromkeys(("ES", "PS", "NS", "S"), metric)}
            for layer in (0, 2, 4)]  # fmt: skip
    figures.layer_sweep(tmp_path, rows, averages(), "m")
    ax = captured[0].axes[-1]
    xs = [tuple(line.get_xdata()) for line in ax.get_lines() if len(line.get_xdata()) == 3]
    assert len(set(xs)) == 4  # four identical series, four distinct x offsets
    ticks = ax.get_xticks()
    assert np.allclose(ticks, np.round(ticks))  # no fractional layer ticks
    legend = ax.get_legend()
    assert legend.get_bbox_to_anchor().y1 < ax.get_window_extent().y0 + 1  # under the axes


def test_one_prompt_draws_no_interval_and_says_so(tmp_path, captured):
    rng = np.random.default_rng(0)
    single = aggregate([trace_record(rng, 0)], list(KINDS))
    figures.severed_bars(tmp_path, single, "m")
    figures.last_subject_lines(tmp_path, single, "m")
    assert "no interval (n=1)" in captured[0].axes[0].get_title()
    assert not [c for c in captured[0].axes[0].containers if c.errorbar is not None]
    assert "no interval (n=1)" in captured[1].axes[0].get_title()


def test_effect_intervals_stop_at_the_possible_range(tmp_path, captured):
    wide = averages()
    wide["kinds"]["mlp"]["low"][2] = [-3.0] * LAYERS  # a t interval over two prompts, say
    wide["kinds"]["mlp"]["high"][2] = [4.0] * LAYERS
    figures.last_subject_lines(tmp_path, wide, "m")
    band = captured[0].axes[0].collections[1]  # hidden's band first, then MLP's
    ys = np.concatenate([path.vertices[:, 1] for path in band.get_paths()])
    assert ys.min() >= -1.0 and ys.max() <= 1.0


def scaling_point(size, mean, low, high, em=50.0):
    rate = {"mean": mean, "low": low, "high": high, "n": size}
    return {"size": size, "post": {**dict.fromkeys(("S", "ES", "PS", "NS"), rate), "EM": em}}


def test_scaling_draws_the_unedited_baseline_names_and_no_whisker_on_one_case(tmp_path, captured):
    curves = {
        "r-rome": [scaling_point(1, 100, 20.7, 100), scaling_point(10, 80, 50, 95)],
        "alphaedit": [scaling_point(1, 100, 20.7, 100), scaling_point(10, 50, 30, 70)],
    }
    unedited = {k: {"mean": 39.0, "low": 33.0, "high": 44.0} for k in ("S", "ES", "PS", "NS")}

    def collapsed(point):
        return "no preference" if point["size"] == 10 and point["post"]["S"]["mean"] == 50 else None

    figures.edit_scaling(tmp_path, curves, "m", unedited=unedited, collapsed=collapsed)
    fig = captured[0]
    ax = fig.axes[0]
    dashed = [line for line in ax.get_lines() if line.get_linestyle() == "--"]
    assert len(dashed) == 1 and dashed[0].get_ydata()[0] == 39.0
    for container in ax.containers:  # the one-case point (size 1) has no whisker
        whiskers = container.lines[2][0].get_segments()
        size_one = [seg for seg in whiskers if seg[0][0] < 2]
        assert all(abs(seg[1][1] - seg[0][1]) == 0 for seg in size_one)
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert {"r-ROME", "AlphaEdit", "unedited (Table 4)"} <= set(legend)
    assert "collapsed (metrics/collapse.py)" in legend


def test_layer_sweep_draws_the_unedited_score_dashed_and_aie_axes_carry_their_unit(
    tmp_path, captured
):
    metric = {"mean": 90.0, "low": 80.0, "high": 95.0, "n": 5}
    rows = [{"layer": layer, "n": 5, "post": dict.fromkeys(("ES", "PS", "NS", "S"), metric),
             "pre": {"S": {"mean": 36.0}}} for layer in (0, 1, 2)]  # fmt: skip
    figures.layer_sweep(tmp_path, rows, averages(), "m")
    dashed = [line for line in captured[0].axes[-1].get_lines() if line.get_linestyle() == "--"]
    assert len(dashed) == 1 and dashed[0].get_ydata()[0] == 36.0
    figures.last_subject_lines(tmp_path, averages(), "m")
    figures.severed_bars(tmp_path, averages(), "m")
    assert all("Δ p(answer)" in fig.axes[0].get_ylabel() for fig in captured)


def test_pairwise_heatmap_is_antisymmetric_and_starred_by_holm(tmp_path, captured):
    def pair(a, b, delta, p_holm):
        return {"a": a, "b": b, "n": 20, "metrics": {"S": {"mean": delta, "p_holm": p_holm}}}

    found = [pair("rome", "none", 40.0, 0.001), pair("ft-l (did not edit)", "none", 2.0, 0.3),
             pair("ft-l (did not edit)", "rome", -38.0, 0.001)]  # fmt: skip
    figures.pairwise_heatmap(tmp_path, found, "m")
    ax = captured[0].axes[0]
    texts = {t.get_text() for t in ax.texts}
    assert {"+40.0*", "-40.0*", "+2.0", "-2.0", "-38.0*", "+38.0*"} == texts
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels == ["unedited", "ROME", "FT-L (did not edit)"]


def test_perplexity_scaling_draws_each_editor_and_the_unedited_line(captured, tmp_path):
    def point(size, mean):
        return {"size": size, "perplexity": {"mean": mean, "low": mean - 1, "high": mean + 2}}

    curves = {"memit": [point(1, 20.0), point(10, 25.0)], "rome": [point(1, 21.0)]}
    path = figures.perplexity_scaling(
        tmp_path, curves, "m", unedited={"mean": 19.0, "low": 18.0, "high": 20.0}
    )
    assert path.name == "mass_scaling_perplexity.png"
    (ax,) = captured[0].axes
    bars = {container.get_label(): container for container in ax.containers}
    assert list(bars["memit"].lines[0].get_ydata()) == [20.0, 25.0]
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert list(lines["unedited"].get_ydata()) == [19.0, 19.0]  # the dashed baseline
    assert lines["unedited"].get_linestyle() == "--"
    assert ax.get_yscale() == "log"
    # Curves without perplexity (runs from before it, or eval.perplexity=false): no figure.
    bare = {"memit": [{"size": 1, "post": {}}]}
    assert figures.perplexity_scaling(tmp_path, bare, "m", name="sequential_scaling") is None
