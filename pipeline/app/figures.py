"""Figures of causal traces, as in the paper: one colour per kind across every figure.

Each figure is written as PNG and PDF; functions return the PNG paths by name. Average effects
are drawn on a diverging scale centred at zero (white = no effect, the kind's colour = restoring
helps, blue = restoring hurts); a bucket no prompt has is hatched grey and labelled n=0.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import LinearSegmentedColormap, Normalize  # noqa: E402
from matplotlib.ticker import FuncFormatter, MaxNLocator  # noqa: E402

KIND_COLOURS = {"hidden": "Purples", "mlp": "Greens", "attn": "Reds"}
KIND_LINES = {"hidden": "#6a3d9a", "mlp": "#33a02c", "attn": "#e31a1c", "none": "#6a3d9a"}
KIND_TITLES = {"hidden": "hidden state", "mlp": "MLP output", "attn": "attention output"}
NEGATIVE = "#2c7bb6"  # restoring lowered p(answer)
POOLING_NOTES = {
    "prompt": "one sample per prompt and bucket",
    "paper": "tokens pooled as the paper's notebook",
}
# The editors' names as the papers write them (legends, matrix labels); `editor=` names otherwise.
EDITOR_NAMES = {
    "none": "unedited",
    "ft": "FT",
    "ft-l": "FT-L",
    "kn": "KN",
    "rome": "ROME",
    "rome-reference": "ROME (reference code)",
    "r-rome": "r-ROME",
    "memit": "MEMIT",
    "emmet": "EMMET",
    "alphaedit": "AlphaEdit",
    "memit-reference": "MEMIT (reference code)",
    "emmet-reference": "EMMET (reference code)",
    "alphaedit-reference": "AlphaEdit (reference code)",
}
AIE_UNIT = "(Δ p(answer))"
BASELINE = {"color": "#666666", "linestyle": "--", "linewidth": 0.9}  # the unedited model
BUCKET_LABELS = [
    "first subject token",
    "middle subject tokens",
    "last subject token",
    "first subsequent token",
    "further tokens",
    "last token",
]


def _save(fig, out_dir: Path, name: str) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    png = out_dir / f"{name}.png"
    fig.savefig(png, dpi=150, bbox_inches="tight")
    # No creation date: a rebuilt report's PDFs are the committed ones, byte for byte.
    fig.savefig(out_dir / f"{name}.pdf", bbox_inches="tight", metadata={"CreationDate": None})
    plt.close(fig)
    return png


def example_heatmap(
    out_dir: Path, record: dict[str, Any], kind: str, name: str, model: str
) -> Path:
    """P(answer) after restoring each (token, layer) of one prompt; subject tokens starred."""
    grid = np.asarray(record["kinds"][kind])
    start, end = record["subject_span"]
    labels = [
        f"{tok!r}"[1:-1] + ("*" if start <= i < end else "")
        for i, tok in enumerate(record["tokens"])
    ]
    fig, ax = plt.subplots(figsize=(3.6, 0.28 * len(labels) + 1.2))
    image = ax.pcolormesh(
        np.arange(grid.shape[1] + 1) - 0.5,  # cell i centred on tick i
        np.arange(grid.shape[0] + 1),
        grid,
        cmap=KIND_COLOURS[kind],
        vmin=record["corrupted"],
    )
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.invert_yaxis()
    ax.set_yticks(np.arange(len(labels)) + 0.5, labels, fontsize=8)
    window = record.get("window", 10)
    ax.set_xlabel("layer" + (f" (centre of a {window}-layer window)" if kind != "hidden" else ""))
    ax.set_title(f"Impact of restoring {KIND_TITLES[kind]}\n{model}", fontsize=9)
    bar = fig.colorbar(image, ax=ax)
    bar.set_label(f"p({record['answer'].strip()})")
    return _save(fig, out_dir, name)


def layer_axis(kind: str, window: int) -> str:
    """What a trace's x value is: a layer, or (MLP, attention) the centre of a window of layers."""
    if kind == "hidden":
        return "layer"
    return f"centre of a {window}-layer window"


def effect_bound(values: Any) -> np.ndarray:
    """Interval ends of an effect on a probability, clipped to the possible [-1, 1] (a t
    interval over a few prompts reaches past it)."""
    return np.clip(np.asarray(values, dtype=float), -1.0, 1.0)


def interval_note(n: int) -> str:
    return "95% t intervals" if n >= 2 else f"no interval (n={n})"


def diverging(kind: str) -> LinearSegmentedColormap:
    """Blue below zero, white at zero, the kind's colour above."""
    return LinearSegmentedColormap.from_list(
        f"{kind}_diverging", [NEGATIVE, "white", KIND_LINES[kind]]
    )


def symmetric_norm(values: np.ndarray) -> Normalize:
    """A colour scale centred at zero that holds every finite value."""
    finite = np.abs(values[np.isfinite(values)])
    extent = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
    return Normalize(vmin=-extent, vmax=extent)


def pooled(averages: dict[str, Any], pooling: str | None = None) -> dict[str, Any]:
    """The averages with `kinds` pooled as asked (`prompt` or `paper`), when the file has both."""
    pooling = pooling or averages.get("pooling", "prompt")
    if pooling == averages.get("pooling", "prompt"):
        return {**averages, "pooling": pooling}
    if pooling not in averages.get("poolings", {}):
        raise ValueError(f"averages.json has no {pooling!r} pooling (trace again to add it)")
    return {**averages, "kinds": averages["poolings"][pooling], "pooling": pooling}


def average_heatmap(out_dir: Path, averages: dict[str, Any], kind: str, model: str) -> Path:
    """Average indirect effect by token bucket and layer over all traced prompts."""
    stats = averages["kinds"][kind]
    mean = np.asarray(stats["mean"], dtype=float)
    counts = stats["count"]
    pooling = averages.get("pooling", "prompt")
    unit = "token rows" if pooling == "paper" else "prompts"
    fig, ax = plt.subplots(figsize=(4.6, 2.6))
    ax.set_facecolor("#e6e6e6")  # empty buckets are masked: the hatched background shows
    ax.patch.set_hatch("////")
    ax.patch.set_edgecolor("#b0b0b0")
    image = ax.pcolormesh(
        np.arange(mean.shape[1] + 1) - 0.5,  # cell i centred on tick i
        np.arange(mean.shape[0] + 1),
        np.ma.masked_invalid(mean),
        cmap=diverging(kind),
        norm=symmetric_norm(mean),
    )
    ax.invert_yaxis()
    ax.set_yticks(
        np.arange(len(BUCKET_LABELS)) + 0.5,
        [
            f"{b} (n={c})" + (": none, not drawn" if c == 0 else "")
            for b, c in zip(BUCKET_LABELS, counts, strict=True)
        ],
        fontsize=7,
    )
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(layer_axis(kind, averages.get("window", 10)))
    ax.set_title(
        f"Average indirect effect, {KIND_TITLES[kind]}\n{model}, {averages['n_prompts']} prompts; "
        f"{POOLING_NOTES[pooling]} (n: {unit})",
        fontsize=8,
    )
    bar = fig.colorbar(image, ax=ax)
    bar.set_label("average indirect effect\n(Δ p(answer); 0 = white)", fontsize=7)
    return _save(fig, out_dir, f"average_{kind}")


def last_subject_lines(out_dir: Path, averages: dict[str, Any], model: str) -> Path:
    """AIE at the last subject token by layer, per kind, with 95% bands."""
    row = BUCKET_LABELS.index("last subject token")
    fig, ax = plt.subplots(figsize=(4.2, 2.6))
    for kind, stats in averages["kinds"].items():
        mean = np.asarray(stats["mean"][row], dtype=float)
        layers = np.arange(len(mean))
        ax.plot(
            layers,
            mean,
            color=KIND_LINES[kind],
            label=f"{KIND_TITLES[kind]} (n={stats['count'][row]})",
        )
        ax.fill_between(
            layers,
            effect_bound(stats["low"][row]),
            effect_bound(stats["high"][row]),
            color=KIND_LINES[kind],
            alpha=0.2,
        )
    ax.axhline(0, color="#999999", linewidth=0.6)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    window = averages.get("window", 10)
    ax.set_xlabel(f"layer (MLP, attention: {layer_axis('mlp', window)})")
    ax.set_ylabel(f"AIE at last subject token\n{AIE_UNIT}", fontsize=8)
    pooling = averages.get("pooling", "prompt")
    n = min(stats["count"][row] for stats in averages["kinds"].values())
    ax.set_title(
        f"Average indirect effect, {interval_note(n)}\n{model}; {POOLING_NOTES[pooling]}",
        fontsize=9,
    )
    ax.legend(fontsize=7)
    return _save(fig, out_dir, "last_subject_aie")


def severed_bars(out_dir: Path, averages: dict[str, Any], model: str) -> Path:
    """Hidden-state AIE at the last subject token with the later MLP or attention severed."""
    severed = averages["severed"]
    names = {
        "none": "effect of single state",
        "mlp": "with MLP severed",
        "attn": "with attn severed",
    }
    colours = {"none": "#6a3d9a", "mlp": "#33a02c", "attn": "#e31a1c"}
    fig, ax = plt.subplots(figsize=(4.8, 2.6))
    n_layers = len(severed["none"]["mean"])
    width = 0.28
    for offset, name in zip((-width, 0, width), ("none", "mlp", "attn"), strict=True):
        if name not in severed:
            continue
        mean = np.asarray(severed[name]["mean"], dtype=float)
        low = effect_bound(severed[name]["low"])
        high = effect_bound(severed[name]["high"])
        has_interval = bool(np.isfinite(low).any())
        ax.bar(
            np.arange(n_layers) + offset,
            mean,
            width,
            yerr=[np.nan_to_num(mean - low), np.nan_to_num(high - mean)] if has_interval else None,
            error_kw={"elinewidth": 0.6, "capsize": 1, "ecolor": "#333333"},
            color=colours[name],
            label=names[name],
        )
    ax.axhline(0, color="#999999", linewidth=0.6)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("layer at which the single hidden state is restored")
    ax.set_ylabel(f"AIE at last subject token\n{AIE_UNIT}", fontsize=8)
    ax.set_title(
        f"Severing MLP or attention paths, {interval_note(severed['none']['n'])}\n{model}, "
        f"n={severed['none']['n']}",
        fontsize=9,
    )
    ax.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.22), frameon=False)
    return _save(fig, out_dir, "severed")


def trace_figures(
    out_dir: Path, averages: dict[str, Any], examples: list[dict[str, Any]], model: str
) -> dict[str, Path]:
    """The trace's figures; every title says "estimate" when the averages are one."""
    if averages.get("estimate"):
        model = f"{model}, ESTIMATE (attribution patching)"
    paths: dict[str, Path] = {}
    for index, record in enumerate(examples):
        for kind in record["kinds"]:
            name = f"example_{index}_{kind}"
            paths[name] = example_heatmap(out_dir, record, kind, name, model)
    for kind in averages["kinds"]:
        paths[f"average_{kind}"] = average_heatmap(out_dir, averages, kind, model)
    paths["last_subject_aie"] = last_subject_lines(out_dir, averages, model)
    if "severed" in averages:
        paths["severed"] = severed_bars(out_dir, averages, model)
    return paths


SWEEP_COLOURS = {"ES": "#1f78b4", "PS": "#ff7f00", "NS": "#b15928", "S": "#333333"}
SWEEP_MARKERS = {"ES": "o", "PS": "s", "NS": "^", "S": "D"}


def layer_sweep(
    out_dir: Path, rows: list[dict[str, Any]], averages: dict[str, Any] | None, model: str
) -> Path:
    """ROME's success and specificity by edited layer, under the causal effect at each layer.

    The four series are shifted a little sideways with their own markers, so equal values (ES =
    PS = 100, say) stay visible; the legend sits under the axes, never over the data.
    """
    panels = 2 if averages else 1
    fig, axes = plt.subplots(panels, 1, figsize=(5.2, 2.4 * panels + 0.9), sharex=True)
    axes = np.atleast_1d(axes)
    layers = np.array([r["layer"] for r in rows], dtype=float)
    # Series shifted sideways by a fraction of a layer: at most a third of the gap between swept
    # layers, and wide enough to see on a long axis.
    step = float(np.min(np.diff(np.unique(layers)))) if len(np.unique(layers)) > 1 else 1.0
    n_trace = len(next(iter(averages["kinds"].values()))["mean"][0]) if averages else 0
    span = max(float(np.ptp(layers)), n_trace)
    shift = min(step / 3 / 1.5, max(0.12, span / 120))
    if averages:
        row = BUCKET_LABELS.index("last subject token")
        for kind in ("mlp", "hidden"):
            if kind not in averages["kinds"]:
                continue
            stats = averages["kinds"][kind]
            mean = np.asarray(stats["mean"][row], dtype=float)
            trace_layers = np.arange(len(mean))
            label = KIND_TITLES[kind] + (
                f" (x: {layer_axis(kind, averages.get('window', 10))})" if kind != "hidden" else ""
            )
            axes[0].plot(trace_layers, mean, color=KIND_LINES[kind], label=label)
            axes[0].fill_between(
                trace_layers,
                effect_bound(stats["low"][row]),
                effect_bound(stats["high"][row]),
                color=KIND_LINES[kind],
                alpha=0.2,
            )
        axes[0].axhline(0, color="#999999", linewidth=0.6)
        axes[0].set_ylabel("AIE at last subject\ntoken (Δ p(answer))", fontsize=8)
        axes[0].set_title(f"Causal effect and edit success by layer\n{model}", fontsize=9)
        axes[0].legend(fontsize=6, loc="upper right")
    ax = axes[-1]
    for index, name in enumerate(("ES", "PS", "NS", "S")):
        mean = np.array([r["post"][name]["mean"] for r in rows], dtype=float)
        low = np.array([r["post"][name]["low"] for r in rows], dtype=float)
        high = np.array([r["post"][name]["high"] for r in rows], dtype=float)
        ax.errorbar(
            layers + (index - 1.5) * shift,
            mean,
            yerr=[np.nan_to_num(mean - low), np.nan_to_num(high - mean)],
            color=SWEEP_COLOURS[name],
            marker=SWEEP_MARKERS[name],
            markersize=3.5,
            linewidth=1,
            capsize=2,
            label=name,
        )
    unedited = [r["pre"]["S"]["mean"] for r in rows if "S" in (r.get("pre") or {})]
    if unedited:  # the same cases unedited: one value (every layer scored the same cases)
        ax.axhline(float(np.mean(unedited)), **BASELINE, label="S unedited")
    if not averages:
        ax.set_title(f"ROME by edited layer\n{model}", fontsize=9)
    ax.set_ylim(-3, 106)  # room for markers at 0 and 100
    ax.tick_params(labelsize=7)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("edited layer")
    ax.set_ylabel("score after the edit (%)", fontsize=8)
    counts = sorted({r["n"] for r in rows})
    n_text = f"n={counts[0]}" if len(counts) == 1 else f"n={counts[0]}-{counts[-1]}"
    ax.legend(
        fontsize=7,
        ncol=5,
        loc="upper center",
        bbox_to_anchor=(0.5, -0.3),
        title=f"95% intervals: Wilson (ES, PS, NS), bootstrap (S); {n_text} cases per layer",
        title_fontsize=6.5,
        frameon=False,
    )
    return _save(fig, out_dir, "layer_sweep")


SCALING = {  # figure name -> (x label, title)
    "mass_scaling": (
        "edits written at once",
        "Mass editing: every edited case scored on the edited model",
    ),
    "sequential_scaling": (
        "edits so far",
        "Sequential editing: edits written one after another, every case so far scored",
    ),
}


def edit_scaling(
    out_dir: Path,
    curves: dict[str, list[dict[str, Any]]],
    model: str,
    name: str = "mass_scaling",
    kind: str | None = None,
    unedited: dict[str, Any] | None = None,
    collapsed: Any = None,
) -> Path:
    """S, ES, PS and NS against the number of edits, one line per editor, with 95% intervals
    (the MEMIT paper's scaling figure): edits written at once (`mass_scaling`) or one after
    another (`sequential_scaling`); points are {"size", "post": {metric: interval}}. Editors are
    shifted a little sideways (a few percent of N) so equal values stay visible; the legend sits
    under the axes.

    `unedited` (the unedited model's metrics, Table 4) is drawn as a dashed line in each panel.
    A point resting on one case has no whisker (its Wilson interval, [20.7, 100], would dwarf
    the rest) and is drawn hollow; `collapsed(point)` (a reason or None) marks collapsed points
    with a cross. `kind` (a key of SCALING; default: `name`) sets the axis label and title
    where the file is named apart (a further data set's curves)."""
    xlabel, title = SCALING[kind or name]
    names = ("S", "ES", "PS", "NS")
    fig, axes = plt.subplots(1, 4, figsize=(11, 3.2), sharey=True)
    colours = plt.get_cmap("tab10")
    editors = sorted(curves)
    all_sizes = sorted({point["size"] for curve in curves.values() for point in curve})
    marked = False
    for index, editor in enumerate(editors):
        curve = curves[editor]
        shift = 1.05 ** (index - (len(editors) - 1) / 2)
        sizes = np.array([point["size"] for point in curve], dtype=float) * shift
        for ax, metric in zip(axes, names, strict=True):
            mean = np.array([p["post"][metric]["mean"] for p in curve], dtype=float)
            low = np.array([p["post"][metric]["low"] for p in curve], dtype=float)
            high = np.array([p["post"][metric]["high"] for p in curve], dtype=float)
            single = np.array([p["post"][metric].get("n", p["size"]) < 2 for p in curve])
            ax.errorbar(
                sizes,
                mean,
                yerr=[
                    np.where(single, 0, np.nan_to_num(mean - low)),
                    np.where(single, 0, np.nan_to_num(high - mean)),
                ],
                marker="o",
                markersize=3,
                capsize=2,
                linewidth=1,
                color=colours(index),
                label=EDITOR_NAMES.get(editor, editor),
            )
            if single.any():
                ax.plot(sizes[single], mean[single], "o", markersize=5, color="white",
                        markeredgecolor=colours(index), zorder=3)  # fmt: skip
            down = [bool(collapsed and collapsed(p)) for p in curve]
            if any(down):
                marked = True
                ax.plot(sizes[down], mean[down], "x", markersize=7, color="#000000", zorder=4,
                        label="collapsed (metrics/collapse.py)")  # fmt: skip
    for ax, metric in zip(axes, names, strict=True):
        if unedited and metric in unedited:
            ax.axhline(unedited[metric]["mean"], **BASELINE, label="unedited (Table 4)")
        ax.set_xscale("log")
        ax.set_xticks(all_sizes, [f"{n:,}" for n in all_sizes], fontsize=7)
        if len(all_sizes) > 4:
            plt.setp(ax.get_xticklabels(), rotation=45, ha="right", rotation_mode="anchor")
        ax.xaxis.set_minor_locator(plt.NullLocator())
        ax.tick_params(axis="y", labelsize=7)
        ax.set_title(metric, fontsize=9)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.set_ylim(-3, 106)
    axes[0].set_ylabel("after the edits (%)")
    handles, labels = axes[0].get_legend_handles_labels()
    if marked and "collapsed (metrics/collapse.py)" not in labels:
        for ax in axes[1:]:
            more = ax.get_legend_handles_labels()
            if "collapsed (metrics/collapse.py)" in more[1]:
                at = more[1].index("collapsed (metrics/collapse.py)")
                handles, labels = [*handles, more[0][at]], [*labels, more[1][at]]
                break
    unique = dict(zip(labels, handles, strict=True))
    fig.legend(
        unique.values(),
        unique.keys(),
        loc="lower center",
        ncol=max(1, min(len(unique), 6)),
        fontsize=7,
        frameon=False,
        title="95% intervals: bootstrap (S), Wilson (ES, PS, NS); hollow: one case, no interval",
        title_fontsize=7,
    )
    fig.suptitle(f"{title} ({model})", fontsize=9)
    fig.subplots_adjust(bottom=0.38, top=0.84, wspace=0.08)
    return _save(fig, out_dir, name)


def pairwise_heatmap(out_dir: Path, found: list[dict[str, Any]], model: str) -> Path:
    """ΔS of every pair of runs (row minus column, percentage points) on their common cases,
    starred where Holm's adjusted p is below 0.05 (`app/pairwise.py`)."""
    names = list(dict.fromkeys([c["b"] for c in found] + [c["a"] for c in found]))
    index = {n: i for i, n in enumerate(names)}
    delta = np.full((len(names), len(names)), np.nan)
    stars = np.zeros_like(delta, dtype=bool)
    for c in found:
        s = c["metrics"]["S"]
        i, j = index[c["a"]], index[c["b"]]
        delta[i, j], delta[j, i] = s["mean"], -s["mean"]
        stars[i, j] = stars[j, i] = s.get("p_holm", 1.0) < 0.05
    labels = [
        EDITOR_NAMES.get(n.split(" (")[0], n.split(" (")[0])
        + (" (" + n.split(" (", 1)[1] if " (" in n else "")
        for n in names
    ]
    size = 0.55 * len(names) + 2
    fig, ax = plt.subplots(figsize=(size + 1, size))
    norm = symmetric_norm(delta)
    image = ax.imshow(delta, cmap="RdBu", norm=norm)
    for i in range(len(names)):
        for j in range(len(names)):
            if np.isfinite(delta[i, j]):
                dark = abs(delta[i, j]) > 0.6 * norm.vmax  # white text on the deep colours
                ax.text(j, i, f"{delta[i, j]:+.1f}" + ("*" if stars[i, j] else ""), ha="center",
                        va="center", fontsize=6, color="white" if dark else "black")  # fmt: skip
    ax.set_xticks(range(len(names)), labels, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(len(names)), labels, fontsize=7)
    ax.set_xlabel("B", fontsize=8)
    ax.set_ylabel("A", fontsize=8)
    n = sorted({c["n"] for c in found})
    ax.set_title(
        f"ΔS = S(A) − S(B) on the same cases (n={n[0]}"
        + (f"-{n[-1]}" if len(n) > 1 else "")
        + f"), paired bootstrap; * Holm p < 0.05\n{model}",
        fontsize=8,
    )
    bar = fig.colorbar(image, ax=ax, shrink=0.8)
    bar.set_label("ΔS (percentage points)", fontsize=7)
    return _save(fig, out_dir, "pairwise")


def perplexity_scaling(
    out_dir: Path,
    curves: dict[str, list[dict[str, Any]]],
    model: str,
    name: str = "mass_scaling",
    kind: str | None = None,
    unedited: dict[str, Any] | None = None,
) -> Path | None:
    """Perplexity on the held-out text against the number of edits, one line per editor, with
    its interval over the text's windows, and the unedited model's as a dashed line: the damage
    beside `edit_scaling`'s scores (`<name>_perplexity`). Points are {"size", "perplexity"};
    None where no point has one (runs with eval.perplexity=false or from before it)."""
    xlabel, title = SCALING[kind or name]
    measured = {
        editor: [p for p in curve if p.get("perplexity")] for editor, curve in curves.items()
    }
    measured = {editor: curve for editor, curve in measured.items() if curve}
    if not measured:
        return None
    fig, ax = plt.subplots(figsize=(4.6, 3.4))
    colours = plt.get_cmap("tab10")
    editors = sorted(measured)
    for index, editor in enumerate(editors):
        curve = measured[editor]
        shift = 1.05 ** (index - (len(editors) - 1) / 2)
        sizes = np.array([p["size"] for p in curve], dtype=float) * shift
        mean = np.array([p["perplexity"]["mean"] for p in curve], dtype=float)
        low = np.array([p["perplexity"]["low"] for p in curve], dtype=float)
        high = np.array([p["perplexity"]["high"] for p in curve], dtype=float)
        ax.errorbar(
            sizes,
            mean,
            yerr=[np.nan_to_num(mean - low), np.nan_to_num(high - mean)],
            marker="o",
            markersize=3,
            capsize=2,
            linewidth=1,
            color=colours(index),
            label=editor,
        )
    if unedited:
        ax.axhline(unedited["mean"], color="0.4", linestyle="--", linewidth=1, label="unedited")
    all_sizes = sorted({p["size"] for curve in measured.values() for p in curve})
    ax.set_xscale("log")
    ax.set_yscale("log")  # a collapse multiplies perplexity: ratios read evenly
    plain = FuncFormatter(lambda value, _: f"{value:g}")
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain)
    ax.tick_params(axis="both", which="both", labelsize=7)
    ax.set_xticks(all_sizes, [str(n) for n in all_sizes])
    ax.xaxis.set_minor_locator(plt.NullLocator())
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel("perplexity on the held-out text", fontsize=8)
    ax.legend(fontsize=7, frameon=False, title="95% interval over windows", title_fontsize=7)
    ax.set_title(f"{title.split(':')[0]}: damage to the model ({model})", fontsize=9)
    fig.tight_layout()
    return _save(fig, out_dir, f"{name}_perplexity")
