"""Editor against editor: every pair of runs of one model and data set, on their common cases.

For each pair (A, B) of Table 4's runs (the unedited `editor=none` run is one of them), cases are
matched by id and `metrics.paired` gives A - B: ES, PS and NS (Newcombe's paired interval and
the exact McNemar test on 0/1 cases, a paired t and the sign test on case averages), S (a
paired bootstrap over cases, seeded), and GE and perplexity where the cases carry them (paired
t). Holm's correction runs over the pairs of one model, data set and metric. Rates and S are in
percentage points. Written as Markdown, LaTeX and CSV beside Table 4.

The same comparison at each size of a mass or sequential curve (`scaling_comparisons`): the
editors' scores of the same cases after the same number of edits, Holm over the pairs of a size.
"""

from __future__ import annotations

import csv
import io as text_io
import math
from typing import Any

import numpy as np

from metrics.paired import holm, mean_difference, rate_difference, score_difference
from pipeline.app.stage import Run
from pipeline.app.tables import case_values, editor_order, label
from pipeline.core import files

RATES = ("ES", "PS", "NS")
MAGNITUDES = ("GE", "perplexity")
METRICS = ("S", *RATES, *MAGNITUDES)
ALPHA = 0.05  # a Holm-adjusted p below this is marked * in the tables and the figure


def _percent(result: dict[str, Any]) -> dict[str, Any]:
    return {k: v * 100 if k in ("mean", "low", "high") else v for k, v in result.items()}


def compare(a: dict[str, Any], b: dict[str, Any], seed: int = 0) -> dict[str, Any] | None:
    """A - B for two Table 4 rows that carry per-case values (`tables.collect`), on the cases
    both ran; None with fewer than two common cases."""
    common = sorted(set(a["cases"]) & set(b["cases"]), key=str)
    if len(common) < 2:
        return None

    def values(row: dict[str, Any], name: str) -> np.ndarray:
        return np.array([row["cases"][i]["post"][name] for i in common], dtype=np.float64)

    found: dict[str, dict[str, Any]] = {}
    x_rates = np.column_stack([values(a, k) for k in RATES])
    y_rates = np.column_stack([values(b, k) for k in RATES])
    found["S"] = _percent(score_difference(x_rates, y_rates, seed=seed))
    for column, name in enumerate(RATES):
        found[name] = _percent(rate_difference(x_rates[:, column], y_rates[:, column]))
    for name in MAGNITUDES:
        difference = mean_difference(values(a, name), values(b, name))
        if difference["n"] >= 2:
            found[name] = difference
    return {"model": a["model"], "data": a["data"], "a": label(a), "b": label(b),
            "n": len(common), "metrics": found}  # fmt: skip


def comparisons(table: list[dict[str, Any]], seed: int = 0) -> list[dict[str, Any]]:
    """Every pair of runs per (model, data), in Table 4's order (A the later row, B the earlier:
    an editor minus the unedited model, a successor minus its predecessor), Holm-adjusted."""
    found = []
    runs = [r for r in table if "cases" in r]  # the "none (pre)" stand-in has no cases
    for index, b in enumerate(runs):
        for a in runs[index + 1 :]:
            if (a["model"], a["data"]) == (b["model"], b["data"]):
                pair = compare(a, b, seed)
                if pair is not None:
                    found.append(pair)
    for key in {(c["model"], c["data"]) for c in found}:
        _adjust([c for c in found if (c["model"], c["data"]) == key])
    return found


def scaling_comparisons(
    points: dict[str, dict[int, dict[Any, dict[str, Any]]]],
    model: str,
    data: str,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Every pair of editors at each size of a mass or sequential curve, on the cases both
    scored there (matched by id): `points[editor][size][case id]` holds the case's record
    (`{"post": {"metrics": ...}}`, as `mass-<N>.jsonl` and `checkpoint-<N>.jsonl` keep them).
    Each pair has its `size`, A the later editor in Table 4's order (a successor minus its
    predecessor); Holm's correction runs over the pairs of one size and metric."""
    found = []
    editors = sorted(points, key=lambda name: editor_order({"editor": name}))
    sizes = sorted({size for curve in points.values() for size in curve})
    for size in sizes:
        rows = [
            {
                "model": model,
                "data": data,
                "editor": editor,
                "cases": {
                    i: {"post": case_values(record, "post")}
                    for i, record in points[editor][size].items()
                },
            }
            for editor in editors
            if size in points[editor]
        ]
        at_size = []
        for index, b in enumerate(rows):
            for a in rows[index + 1 :]:
                pair = compare(a, b, seed)
                if pair is not None:
                    at_size.append({**pair, "size": size})
        _adjust(at_size)
        found += at_size
    return found


def _adjust(group: list[dict[str, Any]]) -> None:
    """Holm's adjusted p (`p_holm`) over one family of pairs, metric by metric."""
    for name in METRICS:
        members = [c["metrics"][name] for c in group if name in c["metrics"]]
        for member, adjusted in zip(members, holm([m["p"] for m in members]), strict=True):
            member["p_holm"] = adjusted


def resolution(found: list[dict[str, Any]]) -> list[str]:
    """Markdown lines, one per model and data set: how many pairs each metric's difference
    resolves at this n (Holm p < ALPHA), and which S differences it does not, with their
    intervals: what a reader may and may not conclude from the matrix."""
    lines = []
    for key in sorted({(c["model"], c["data"]) for c in found}):
        group = [c for c in found if (c["model"], c["data"]) == key]
        sizes = sorted({c["n"] for c in group})
        n = f"{sizes[0]:,}" if len(sizes) == 1 else f"{sizes[0]:,}-{sizes[-1]:,}"
        counts = []
        for name in columns(group):
            members = [c["metrics"][name] for c in group if name in c["metrics"]]
            hits = sum(m.get("p_holm", math.nan) < ALPHA for m in members)
            counts.append(f"{name} {hits} of {len(members)}")
        open_s = [
            f"{c['a']} − {c['b']} ({interval(c['metrics']['S'])})"
            for c in group
            if "S" in c["metrics"] and not c["metrics"]["S"].get("p_holm", math.nan) < ALPHA
        ]
        unresolved = "; S not resolved: " + ", ".join(open_s) if open_s else "; every S resolved"
        lines.append(
            f"- {key[1]} ({key[0]}, n = {n} cases per pair): resolved (Holm p < {ALPHA}) "
            + ", ".join(counts)
            + unresolved
        )
    return lines


def scaling_markdown(found: list[dict[str, Any]]) -> str:
    """The scaling pairs as a table: edits, A − B, n, then the differences."""
    names = [m for m in columns(found) if m in ("S", *RATES)]
    head = ["edits", "A − B", "n", *(f"Δ{m}" for m in names)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in found:
        cells = [f"{c['size']:,}", f"{c['a']} − {c['b']}", str(c["n"])]
        cells += [cell(c["metrics"].get(m)) for m in names]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _p(value: float) -> str:
    return "–" if value != value else f"{value:.2g}"


def interval(metric: dict[str, Any], digits: int = 1) -> str:
    """`+d [low, high]`, the difference alone where its interval is NaN."""
    text = f"{metric['mean']:+.{digits}f}"
    if not (math.isnan(metric["low"]) or math.isnan(metric["high"])):
        text += f" [{metric['low']:+.{digits}f}, {metric['high']:+.{digits}f}]"
    return text


def cell(metric: dict[str, Any] | None, digits: int = 1) -> str:
    """`+d [low, high] p (Holm p)`, starred where the Holm-adjusted p is below ALPHA."""
    if not metric or metric.get("n", 0) == 0 or math.isnan(metric["mean"]):
        return "–"
    text = interval(metric, digits)
    star = "*" if metric.get("p_holm", math.nan) < ALPHA else ""
    at = "≤" if metric.get("p_bound") else ""  # a bootstrap p at its floor is a bound
    holm_p = _p(metric.get("p_holm", math.nan))
    return text + f" p {at}{_p(metric['p'])}, Holm {at if holm_p != '1' else ''}{holm_p}{star}"


def columns(found: list[dict[str, Any]]) -> list[str]:
    """The metrics any pair has (GE and perplexity only where cases carry them)."""
    return [m for m in METRICS if any(m in c["metrics"] for c in found)]


def markdown(found: list[dict[str, Any]]) -> str:
    names = columns(found)
    head = ["model", "data", "A − B", "n", *(f"Δ{m}" for m in names)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in found:
        cells = [c["model"], c["data"], f"{c['a']} − {c['b']}", str(c["n"])]
        cells += [cell(c["metrics"].get(m)) for m in names]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def latex(found: list[dict[str, Any]]) -> str:
    names = columns(found)
    lines = [
        r"\begin{tabular}{lll" + "r" * (1 + len(names)) + "}",
        r"\toprule",
        " & ".join(["Model", "Data", "A $-$ B", "n", *(f"$\\Delta${m}" for m in names)]) + r" \\",
        r"\midrule",
    ]
    for c in found:
        cells = [c["model"], c["data"], f"{c['a']} - {c['b']}", str(c["n"])]
        cells += [cell(c["metrics"].get(m)).replace("*", "$^*$") for m in names]
        lines.append(" & ".join(x.replace("_", r"\_") for x in cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def csv_text(found: list[dict[str, Any]]) -> str:
    """One line per pair and metric: the difference, its interval, p, Holm's p, n."""
    out = text_io.StringIO()
    writer = csv.writer(out)
    sized = any("size" in c for c in found)  # scaling pairs: the size after the data
    writer.writerow(["model", "data", *(["size"] if sized else []), "a", "b", "metric", "mean",
                     "low", "high", "n", "p", "p_holm", "interval", "p_bound"])  # fmt: skip
    for c in found:
        for name, m in c["metrics"].items():
            writer.writerow(
                [c["model"], c["data"], *([c.get("size", "")] if sized else []), c["a"], c["b"]]
                + [name]
                + [m.get(k, "") for k in ("mean", "low", "high", "n", "p", "p_holm", "interval")]
                + [m.get("p_bound", False)]
            )
    return out.getvalue()


def write(run: Run, found: list[dict[str, Any]]) -> None:
    """pairwise.md, pairwise.tex and pairwise.csv in the run's directory, and the CSV's lines
    on W&B."""
    files.atomic_write(run.path("pairwise.md"), markdown(found))
    files.atomic_write(run.path("pairwise.tex"), latex(found))
    files.atomic_write(run.path("pairwise.csv"), csv_text(found))
    rows = list(csv.reader(text_io.StringIO(csv_text(found))))
    run.tracker.table("pairwise", rows[0], rows[1:])
