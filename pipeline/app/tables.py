"""The paper's Table 4 from evaluation runs: one row per (model, data, editor), unedited first.

Each run directory `<model>/<data>/<editor>/` is summarized again from its per-case files, so
any set of finished shards counts. Written as Markdown, LaTeX and CSV, and logged to W&B.
"""

from __future__ import annotations

import csv
import io as text_io
from pathlib import Path
from typing import Any

from pipeline.app.results import paired_change, read_jsonl, summarize_records
from pipeline.app.stage import Run
from pipeline.core import files

COLUMNS = ("S", "ES", "PS", "NS", "EM", "PM", "NM", "GE", "RS")


# The paper's Table 4 rows first (FT, FT-L, KN, ROME), then the successors; others after.
EDITOR_ORDER = (
    "ft",
    "ft-l",
    "kn",
    "rome",
    "rome-reference",
    "r-rome",
    "memit",
    "emmet",
    "alphaedit",
)


def editor_order(row: dict[str, Any]) -> tuple[int, str]:
    name = row["editor"]
    return (EDITOR_ORDER.index(name) if name in EDITOR_ORDER else len(EDITOR_ORDER), name)


def collect(runs_dir: Path, seed: int = 0) -> list[dict[str, Any]]:
    """One row per (model, data, editor) with the post-edit metrics, unedited rows first."""
    rows = []
    for run_dir in sorted(p.parent for p in runs_dir.glob("*/*/*/cases-*.jsonl")):
        if rows and rows[-1]["dir"] == str(run_dir):
            continue
        model, data, editor = run_dir.relative_to(runs_dir).parts
        records = {r["id"]: r for r in read_jsonl(sorted(run_dir.glob("cases-*.jsonl")))}
        summary = summarize_records(list(records.values()), seed=seed)
        base = {"model": model, "data": data, "n": summary["n_cases"], "dir": str(run_dir)}
        change = {k: paired_change(list(records.values()), k) for k in ("ES", "PS", "NS")}
        rows.append({**base, "editor": editor, "metrics": summary["post"], "change": change})
        if editor != "none":
            rows.append({**base, "editor": "none (pre)", "metrics": summary["pre"]})
    table = []
    for key in sorted({(r["model"], r["data"]) for r in rows}):
        group = [r for r in rows if (r["model"], r["data"]) == key]
        unedited = [r for r in group if r["editor"] == "none"] or [
            max((r for r in group if r["editor"] == "none (pre)"), key=lambda r: r["n"])
        ]
        table += unedited[:1] + sorted(
            (r for r in group if not r["editor"].startswith("none")), key=editor_order
        )
    return table


def cell(metric: dict[str, Any] | None) -> str:
    """`mean [low, high]`: the interval's own ends (Wilson and bootstrap intervals are not
    symmetric about the mean, and rates stop at 0 and 100); the mean alone where n < 2."""
    if not metric or metric.get("n", 0) == 0:
        return "–"
    text = f"{metric['mean']:.1f}"
    if metric["low"] == metric["low"] and metric["high"] == metric["high"]:  # not NaN
        text += f" [{metric['low']:.1f}, {metric['high']:.1f}]"
    return text


def markdown(table: list[dict[str, Any]]) -> str:
    head = ["model", "data", "editor", "n", *COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in table:
        cells = [row["model"], row["data"], row["editor"], str(row["n"])]
        cells += [cell(row["metrics"].get(c)) for c in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def latex(table: list[dict[str, Any]]) -> str:
    lines = [
        r"\begin{tabular}{lll" + "r" * (1 + len(COLUMNS)) + "}",
        r"\toprule",
        " & ".join(["Model", "Data", "Editor", "n", *COLUMNS]) + r" \\",
        r"\midrule",
    ]
    for row in table:
        cells = [row["model"], row["data"], row["editor"], str(row["n"])]
        cells += [cell(row["metrics"].get(c)) for c in COLUMNS]
        lines.append(" & ".join(c.replace("_", r"\_") for c in cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def csv_text(table: list[dict[str, Any]]) -> str:
    out = text_io.StringIO()
    writer = csv.writer(out)
    fields = [f"{c}_{part}" for c in COLUMNS for part in ("mean", "low", "high", "n")]
    writer.writerow(["model", "data", "editor", "n", *fields])
    for row in table:
        values = []
        for column in COLUMNS:
            metric = row["metrics"].get(column) or {}
            values += [metric.get(part, "") for part in ("mean", "low", "high", "n")]
        writer.writerow([row["model"], row["data"], row["editor"], row["n"], *values])
    return out.getvalue()


def write_table(run: Run, table: list[dict[str, Any]]) -> None:
    """table.md, table.tex and table.csv in the run's directory, and the table on W&B."""
    files.atomic_write(run.path("table.md"), markdown(table))
    files.atomic_write(run.path("table.tex"), latex(table))
    files.atomic_write(run.path("table.csv"), csv_text(table))
    run.tracker.table(
        "table4",
        ["model", "data", "editor", "n", *COLUMNS],
        [
            [r["model"], r["data"], r["editor"], r["n"]]
            + [(r["metrics"].get(c) or {}).get("mean") for c in COLUMNS]
            for r in table
        ],
    )


# --------------------------------------------------------------------------------------------
# zsRE: a table of its own (efficacy, paraphrase, specificity; ROME's Table of zsRE results)

ZSRE_COLUMNS = ("efficacy", "paraphrase", "specificity")


def collect_zsre(runs_dir: Path) -> list[dict[str, Any]]:
    """One row per (model, data, editor) of the zsRE runs (`zsre-cases-*.jsonl`), each model
    and data's unedited row first: the `editor=none` run, else the "pre" scores of its largest
    run."""
    from pipeline.app import zsre  # the stage side of zsRE; Table 4 needs none of it

    rows = []
    for run_dir in sorted({p.parent for p in runs_dir.glob(f"*/*/*/{zsre.CASES_GLOB}")}):
        model, data, editor = run_dir.relative_to(runs_dir).parts
        records = {r["id"]: r for r in read_jsonl(sorted(run_dir.glob(zsre.CASES_GLOB)))}
        summary = zsre.summarize_records(list(records.values()))
        base = {"model": model, "data": data, "n": summary["n_cases"], "dir": str(run_dir)}
        rows.append({**base, "editor": editor, "metrics": summary["post"]})
        if editor != "none":
            rows.append({**base, "editor": "none (pre)", "metrics": summary["pre"]})
    table = []
    for key in sorted({(r["model"], r["data"]) for r in rows}):
        group = [r for r in rows if (r["model"], r["data"]) == key]
        unedited = [r for r in group if r["editor"] == "none"] or [
            max((r for r in group if r["editor"] == "none (pre)"), key=lambda r: r["n"])
        ]
        table += unedited[:1] + sorted(
            (r for r in group if not r["editor"].startswith("none")), key=editor_order
        )
    return table


def zsre_texts(table: list[dict[str, Any]]) -> dict[str, str]:
    """The zsRE table as Markdown, LaTeX and CSV (percent; `mean [low, high]` cells)."""
    head = ["model", "data", "editor", "n", *(c.capitalize() for c in ZSRE_COLUMNS)]
    rows = [
        [r["model"], r["data"], r["editor"], str(r["n"])]
        + [cell(r["metrics"].get(c)) for c in ZSRE_COLUMNS]
        for r in table
    ]
    md = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    md += ["| " + " | ".join(row) + " |" for row in rows]
    tex = [r"\begin{tabular}{lllrrrr}", r"\toprule", " & ".join(head) + r" \\", r"\midrule"]
    tex += [" & ".join(c.replace("_", r"\_") for c in row) + r" \\" for row in rows]
    tex += [r"\bottomrule", r"\end{tabular}"]
    out = text_io.StringIO()
    writer = csv.writer(out)
    parts = ("mean", "low", "high", "n")
    writer.writerow(
        ["model", "data", "editor", "n"] + [f"{c}_{p}" for c in ZSRE_COLUMNS for p in parts]
    )
    for r in table:
        values = [(r["metrics"].get(c) or {}).get(p, "") for c in ZSRE_COLUMNS for p in parts]
        writer.writerow([r["model"], r["data"], r["editor"], r["n"], *values])
    return {"md": "\n".join(md) + "\n", "tex": "\n".join(tex) + "\n", "csv": out.getvalue()}


def write_zsre_table(run: Run, table: list[dict[str, Any]]) -> dict[str, str]:
    """zsre_table.md, .tex and .csv in the run's directory, and the table on W&B."""
    texts = zsre_texts(table)
    for suffix, text in texts.items():
        files.atomic_write(run.path(f"zsre_table.{suffix}"), text)
    run.tracker.table(
        "zsre",
        ["model", "data", "editor", "n", *ZSRE_COLUMNS],
        [
            [r["model"], r["data"], r["editor"], r["n"]]
            + [(r["metrics"].get(c) or {}).get("mean") for c in ZSRE_COLUMNS]
            for r in table
        ],
    )
    return texts
