"""The paper's Table 4 from evaluation runs: one row per (model, data, editor), unedited first.

Each run directory `<model>/<data>/<editor>/` is summarized again from its per-case files.
Written as Markdown, LaTeX and CSV, and logged to W&B. Each row carries the marks the verdicts
read, shown beside the editor's name:

- *partial*: a sharded run that `pipeline.merge` has not combined (no `summary.json`), one merged
  with `--allow-partial` (its summary says `complete: false`), or one whose cases no longer
  match its summary's n (`partial_run`); `pipeline.summarize` refuses these unless
  `allow_partial=true`, as merge does;
- *did not edit*: the editor's ES is not above the same cases' unedited ES beyond the paired
  interval (`metrics.paired.rate_difference` of post against pre ES: Newcombe's interval, its
  lower end not above 0), or its ES is below chance beyond its own interval (the Wilson
  interval's upper end under 50%: most rewrites still prefer the old object). The second is this
  project's addition: FT-L on SmolLM2 moves 7 of 200 cases (ES +3.5 [+0.8, +6.3] points over
  the unedited 33.0, McNemar p = 0.016), a real but immaterial change that leaves ES at 36.5
  [30.1, 43.4]; KN (ES 47.5 [40.7, 54.4], +14.5 [+7.4, +21.4]) is not marked;
- *collapsed*: `metrics.collapse.collapsed`, against the group's unedited perplexity where
  the rows have one.

PPL, the damage to the model: perplexity on the held-out text (`perplexity.json` of the run;
not a percentage): for an editor, the mean over its first `eval.perplexity_cases` cases' edits,
each alone; for the unedited row, the unedited model's; the interval is over the text's windows.
"""

from __future__ import annotations

import csv
import io as text_io
import math
import re
from pathlib import Path
from typing import Any

from metrics.collapse import collapsed
from metrics.paired import rate_difference
from pipeline.app.results import paired_change, read_jsonl, summarize_records
from pipeline.app.stage import Run
from pipeline.core import files

COLUMNS = ("S", "ES", "PS", "NS", "EM", "PM", "NM", "GE", "RS", "PPL")


# The paper's Table 4 rows first (FT, FT-L, KN, ROME), then the successors; others after.
EDITOR_ORDER = (
    "ft",
    "ft-l",
    "kn",
    "rome",
    "rome-reference",
    "r-rome",
    "memit",
    "memit-reference",
    "emmet",
    "emmet-reference",
    "alphaedit",
    "alphaedit-reference",
)


def editor_order(row: dict[str, Any]) -> tuple[int, str]:
    name = row["editor"]
    return (EDITOR_ORDER.index(name) if name in EDITOR_ORDER else len(EDITOR_ORDER), name)


SHARD_FILE = re.compile(r"cases-(\d+)of(\d+)\.jsonl$")
CASE_VALUES = ("ES", "PS", "NS", "GE", "perplexity")  # what the pairwise comparisons read


def partial_run(run_dir: Path, n_cases: int) -> str | None:
    """Why the run in `run_dir` is unfinished, in words, or None (the rule: module docstring)."""
    shards = [SHARD_FILE.search(p.name) for p in run_dir.glob("cases-*.jsonl")]
    count = max((int(m.group(2)) for m in shards if m), default=1)
    summary_path = run_dir / "summary.json"
    if not summary_path.exists():
        if count > 1:
            present = len({m.group(1) for m in shards if m})
            return f"{present} of {count} shards on disk and not merged (python -m pipeline.merge)"
        return None  # an unsharded run's single job: what is on disk is the run
    summary = files.read_json(summary_path)
    if summary.get("complete") is False:
        return f"merged with --allow-partial: {summary.get('missing', '?')} cases missing"
    if count > 1 and summary.get("n_cases") not in (None, n_cases):
        return f"{n_cases} cases on disk, {summary['n_cases']} when merged"
    return None


def case_values(record: dict[str, Any], phase: str) -> dict[str, float]:
    """A case's per-case values (`CASE_VALUES`) in one phase; NaN where absent."""
    scores = record.get(phase) or {}
    values = {**scores.get("metrics", {}), **{k: v for k, v in scores.items() if k != "metrics"}}
    return {k: float(values.get(k, math.nan)) for k in CASE_VALUES}


def edit_effect(cases: dict[Any, dict[str, dict[str, float]]]) -> dict[str, float]:
    """Post-edit ES minus the same cases' unedited ES (percent), Newcombe's paired interval."""
    post = [c["post"]["ES"] for c in cases.values()]
    pre = [c["pre"]["ES"] for c in cases.values()]
    effect = rate_difference(post, pre)
    return {k: v * 100 if k in ("mean", "low", "high") else v for k, v in effect.items()}


def did_not_edit(row: dict[str, Any]) -> bool:
    """The edit is not shown to have happened (the rule: module docstring); False for rows
    that are not edits (the unedited model)."""
    effect = row.get("edit_effect")
    if effect is None:
        return False
    below_chance = (row["metrics"].get("ES") or {}).get("high", float("nan")) < 50
    return not effect["low"] > 0 or below_chance  # a NaN bound: not shown to edit


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
        damage = perplexities(run_dir)
        cases = {
            i: {"pre": case_values(r, "pre"), "post": case_values(r, "post")}
            for i, r in records.items()
        }
        rows.append(
            {
                **base,
                "editor": editor,
                "metrics": {**summary["post"], **damage.get("edited", {})},
                "change": change,
                "cases": cases,
                "partial": partial_run(run_dir, len(records)),
                "edit_effect": edit_effect(cases) if editor != "none" else None,
            }
        )
        if editor != "none":
            pre = {**summary["pre"], **damage.get("unedited", {})}
            rows.append({**base, "editor": "none (pre)", "metrics": pre})
    table = []
    for key in sorted({(r["model"], r["data"]) for r in rows}):
        group = [r for r in rows if (r["model"], r["data"]) == key]
        unedited = [r for r in group if r["editor"] == "none"] or [
            max((r for r in group if r["editor"] == "none (pre)"), key=lambda r: r["n"])
        ]
        reference = unedited[0]["metrics"].get("PPL")
        for row in group:  # the rule judges edited models against the unedited one
            edited = not row["editor"].startswith("none")
            perplexity = row["metrics"].get("PPL")
            row["collapsed"] = collapsed(row["metrics"], perplexity, reference) if edited else None
        table += unedited[:1] + sorted(
            (r for r in group if not r["editor"].startswith("none")), key=editor_order
        )
    return table


def marks(row: dict[str, Any]) -> list[str]:
    """The row's marks: partial, did not edit, collapsed."""
    return [
        mark
        for mark, on in (
            ("partial", row.get("partial")),
            ("did not edit", did_not_edit(row)),
            ("collapsed", row.get("collapsed")),
        )
        if on
    ]


def label(row: dict[str, Any]) -> str:
    """The editor's name with the row's marks in brackets."""
    found = marks(row)
    return row["editor"] + (f" ({', '.join(found)})" if found else "")


BLANK_REASONS = {
    "GE": "the cases have no generation prompts (CounterFact in EasyEdit's reduced schema); "
    "the full-schema data (`data=counterfact-first1000`, `counterfact-mcf`) has ten per case",
    "RS": "RS needs ROME's tf-idf statistics and attribute snippets (`idf.npy`, "
    "`tfidf_vocab.json`, `attribute_snippets.json` beside the data file), which could not be "
    "obtained here; no substitute is reported under this name",
    "PPL": "the run measured no perplexity (made before the damage measurement, or with "
    "`eval.perplexity=false`)",
}


def blank_notes(table: list[dict[str, Any]]) -> list[str]:
    """Why a column is blank ("–") in the rows that leave it blank: a reader must not take a
    missing GE, RS or perplexity for a measured zero or for an oversight."""
    notes = []
    for column, reason in BLANK_REASONS.items():
        blank = [label(r) for r in table if cell(r["metrics"].get(column)) == "–"]
        if blank:
            which = "every row" if len(blank) == len(table) else ", ".join(blank)
            notes.append(f"{column} is blank in {which}: {reason}.")
    return notes


def subset_notes(table: list[dict[str, Any]]) -> list[str]:
    """Where GE is measured on fewer cases than its row (the data's first
    `eval.generation_cases`): on how many, and why, so that its n is not taken for the row's."""
    groups: dict[tuple[int, int], list[str]] = {}
    for row in table:
        generated = (row["metrics"].get("GE") or {}).get("n", 0)
        if 0 < generated < row["n"]:
            groups.setdefault((generated, row["n"]), []).append(label(row))
    return [
        f"GE is over the first {generated:,} of the {n:,} cases in {', '.join(names)} "
        f"(`eval.generation_cases={generated}`): sampling a case's generation prompts is the "
        "costliest part of evaluating it."
        for (generated, n), names in groups.items()
    ]


def perplexities(run_dir: Path) -> dict[str, dict[str, Any]]:
    """{"edited": {"PPL": ...}, "unedited": {"PPL": ...}} from the run's perplexity.json."""
    path = run_dir / "perplexity.json"
    if not path.exists():
        return {}
    saved = files.read_json(path)
    return {phase: {"PPL": saved[phase]} for phase in ("edited", "unedited") if saved.get(phase)}


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
        cells = [row["model"], row["data"], label(row), str(row["n"])]
        cells += [cell(row["metrics"].get(c)) for c in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# How the README and other prose name the editors (the configs' names elsewhere).
DISPLAY_NAMES = {
    "none": "unedited",
    "none (pre)": "unedited (before each edit)",
    "ft": "FT",
    "ft-l": "FT-L",
    "kn": "KN",
    "rome": "ROME",
    "rome-reference": "ROME (reference switches)",
    "r-rome": "r-ROME",
    "memit": "MEMIT",
    "memit-reference": "MEMIT (reference switches)",
    "emmet": "EMMET",
    "emmet-reference": "EMMET (reference switches)",
    "alphaedit": "AlphaEdit",
    "alphaedit-reference": "AlphaEdit (reference switches)",
}
HEADLINE = ("S", "ES", "PS", "NS")
HEADLINE_EXTRA = ("GE", "PPL")  # shown where a row has them


def headline(table: list[dict[str, Any]]) -> str:
    """One data set's rows as the README shows them: the editors' display names with their
    marks, S, ES, PS and NS, then GE and PPL where any row has them (`headline.md`, which
    the README's table must equal: tests/test_reference_report.py)."""
    extra = [c for c in HEADLINE_EXTRA if any(r["metrics"].get(c) for r in table)]
    names = [*HEADLINE, *extra]
    lines = ["| editor | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for row in table:
        found = marks(row)
        name = DISPLAY_NAMES.get(row["editor"], row["editor"])
        name += f" ({', '.join(found)})" if found else ""
        lines.append(f"| {name} | " + " | ".join(cell(row["metrics"].get(c)) for c in names) + " |")
    return "\n".join(lines) + "\n"


def latex(table: list[dict[str, Any]]) -> str:
    lines = [
        r"\begin{tabular}{lll" + "r" * (1 + len(COLUMNS)) + "}",
        r"\toprule",
        " & ".join(["Model", "Data", "Editor", "n", *COLUMNS]) + r" \\",
        r"\midrule",
    ]
    for row in table:
        cells = [row["model"], row["data"], label(row), str(row["n"])]
        cells += [cell(row["metrics"].get(c)) for c in COLUMNS]
        lines.append(" & ".join(c.replace("_", r"\_") for c in cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def csv_text(table: list[dict[str, Any]]) -> str:
    out = text_io.StringIO()
    writer = csv.writer(out)
    fields = [f"{c}_{part}" for c in COLUMNS for part in ("mean", "low", "high", "n")]
    writer.writerow(["model", "data", "editor", "n", *fields, "marks"])
    for row in table:
        values = []
        for column in COLUMNS:
            metric = row["metrics"].get(column) or {}
            values += [metric.get(part, "") for part in ("mean", "low", "high", "n")]
        writer.writerow(
            [row["model"], row["data"], row["editor"], row["n"], *values, "; ".join(marks(row))]
        )
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

ZSRE_COLUMNS = ("efficacy", "paraphrase", "specificity", "PPL")  # PPL: as in Table 4


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
        damage = perplexities(run_dir)
        base = {"model": model, "data": data, "n": summary["n_cases"], "dir": str(run_dir)}
        post = {**summary["post"], **damage.get("edited", {})}
        rows.append({**base, "editor": editor, "metrics": post})
        if editor != "none":
            pre = {**summary["pre"], **damage.get("unedited", {})}
            rows.append({**base, "editor": "none (pre)", "metrics": pre})
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
    head = ["model", "data", "editor", "n", *(c[0].upper() + c[1:] for c in ZSRE_COLUMNS)]
    rows = [
        [r["model"], r["data"], r["editor"], str(r["n"])]
        + [cell(r["metrics"].get(c)) for c in ZSRE_COLUMNS]
        for r in table
    ]
    md = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    md += ["| " + " | ".join(row) + " |" for row in rows]
    tex = [r"\begin{tabular}{lllrrrrr}", r"\toprule", " & ".join(head) + r" \\", r"\midrule"]
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
