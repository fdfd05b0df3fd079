"""Figures of causal traces, as in the paper: one colour per kind across every figure.

Each figure is written as PNG and PDF; functions return the PNG paths by name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

KIND_COLOURS = {"hidden": "Purples", "mlp": "Greens", "attn": "Reds"}
KIND_LINES = {"hidden": "#6a3d9a", "mlp": "#33a02c", "attn": "#e31a1c", "none": "#6a3d9a"}
KIND_TITLES = {"hidden": "hidden state", "mlp": "MLP output", "attn": "attention output"}
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
    fig.savefig(out_dir / f"{name}.pdf", bbox_inches="tight")
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
    image = ax.pcolormesh(grid, cmap=KIND_COLOURS[kind], vmin=record["corrupted"], shading="auto")
    ax.invert_yaxis()
    ax.set_yticks(np.arange(len(labels)) + 0.5, labels, fontsize=8)
    window = record.get("window", 10)
    ax.set_xlabel("layer" + (f" (centre of a {window}-layer window)" if kind != "hidden" else ""))
    ax.set_title(f"Impact of restoring {KIND_TITLES[kind]}\n{model}", fontsize=9)
    bar = fig.colorbar(image, ax=ax)
    bar.set_label(f"p({record['answer'].strip()})")
    return _save(fig, out_dir, name)


def average_heatmap(out_dir: Path, averages: dict[str, Any], kind: str, model: str) -> Path:
    """Average indirect effect by token bucket and layer over all traced prompts."""
    stats = averages["kinds"][kind]
    mean = np.asarray(stats["mean"], dtype=float)
    counts = stats["count"]
    fig, ax = plt.subplots(figsize=(4.2, 2.4))
    image = ax.pcolormesh(np.nan_to_num(mean), cmap=KIND_COLOURS[kind], shading="auto")
    ax.invert_yaxis()
    ax.set_yticks(
        np.arange(len(BUCKET_LABELS)) + 0.5,
        [f"{b} (n={c})" for b, c in zip(BUCKET_LABELS, counts, strict=True)],
        fontsize=7,
    )
    ax.set_xlabel("layer")
    ax.set_title(
        f"Average indirect effect, {KIND_TITLES[kind]}\n{model}, {averages['n_prompts']} prompts",
        fontsize=9,
    )
    bar = fig.colorbar(image, ax=ax)
    bar.set_label("AIE (Δ p(answer))")
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
            np.asarray(stats["low"][row], dtype=float),
            np.asarray(stats["high"][row], dtype=float),
            color=KIND_LINES[kind],
            alpha=0.2,
        )
    ax.set_xlabel("layer")
    ax.set_ylabel("AIE at last subject token")
    ax.set_title(f"Average indirect effect, 95% intervals\n{model}", fontsize=9)
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
        ax.bar(np.arange(n_layers) + offset, mean, width, color=colours[name], label=names[name])
    ax.set_xlabel("layer at which the single hidden state is restored")
    ax.set_ylabel("AIE at last subject token")
    ax.set_title(f"Severing MLP or attention paths\n{model}, n={severed['none']['n']}", fontsize=9)
    ax.legend(fontsize=7)
    return _save(fig, out_dir, "severed")


def trace_figures(
    out_dir: Path, averages: dict[str, Any], examples: list[dict[str, Any]], model: str
) -> dict[str, Path]:
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


def layer_sweep(
    out_dir: Path, rows: list[dict[str, Any]], averages: dict[str, Any] | None, model: str
) -> Path:
    """ROME's success and specificity by edited layer, under the causal effect at each layer."""
    panels = 2 if averages else 1
    fig, axes = plt.subplots(panels, 1, figsize=(4.8, 2.4 * panels + 0.4), sharex=True)
    axes = np.atleast_1d(axes)
    if averages:
        row = BUCKET_LABELS.index("last subject token")
        for kind in ("mlp", "hidden"):
            if kind not in averages["kinds"]:
                continue
            stats = averages["kinds"][kind]
            mean = np.asarray(stats["mean"][row], dtype=float)
            layers = np.arange(len(mean))
            axes[0].plot(layers, mean, color=KIND_LINES[kind], label=KIND_TITLES[kind])
            axes[0].fill_between(
                layers,
                np.asarray(stats["low"][row], dtype=float),
                np.asarray(stats["high"][row], dtype=float),
                color=KIND_LINES[kind],
                alpha=0.2,
            )
        axes[0].set_ylabel("AIE at last subject\ntoken (Δ p(answer))")
        axes[0].set_title(f"Causal effect and edit success by layer\n{model}", fontsize=9)
        axes[0].legend(fontsize=7)
    ax = axes[-1]
    layers = [r["layer"] for r in rows]
    for name in ("ES", "PS", "NS", "S"):
        mean = np.array([r["post"][name]["mean"] for r in rows])
        low = np.array([r["post"][name]["low"] for r in rows])
        high = np.array([r["post"][name]["high"] for r in rows])
        ax.errorbar(
            layers,
            mean,
            yerr=[np.nan_to_num(mean - low), np.nan_to_num(high - mean)],
            color=SWEEP_COLOURS[name],
            marker="o",
            markersize=3,
            capsize=2,
            label=f"{name} (n={rows[0]['n']})" if name == "ES" else name,
        )
    if not averages:
        ax.set_title(f"ROME by edited layer\n{model}", fontsize=9)
    ax.set_ylim(-2, 102)
    ax.set_xlabel("edited layer")
    ax.set_ylabel("score after the edit (%)")
    ax.legend(fontsize=7, ncol=4)
    return _save(fig, out_dir, "layer_sweep")
