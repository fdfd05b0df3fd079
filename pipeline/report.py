"""Stage `report`: every figure and table of the paper from the results on disk, in seconds.

    python -m pipeline.report [experiment=default_smollm2|paper_gpt2xl|paper_gptj]
    make figures                     # the same for the embedded default; `make paper` runs the
                                     # stages whose results are missing first

Reads what the trace, evaluate and layer-sweep stages left (never runs a model) and writes
`reports/<experiment>/`: the figures (PNG and PDF), the CounterFact table (md, tex, csv), the
layer sweep as JSON, and `index.md` with each figure, the table, the paper's numbers beside ours
where it reports them, and the commit and config that produced every input. Missing inputs are
listed in the report with the command that makes them, not silently left out.

With `snapshot_inputs` (the default) the inputs' small files are first copied to
`reports/<experiment>/inputs/` (`app/snapshot.py`) and the report is read from that copy. An
input with no results on disk keeps the copy already there, so on a fresh clone `make figures`
rebuilds the committed report from the repository alone.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from pipeline.app import agreement, cost, figures, findings, pairwise
from pipeline.app.cost import run_cost
from pipeline.app.results import read_jsonl, summarize_records
from pipeline.app.snapshot import inside, snapshot
from pipeline.app.stage import Run, describe_machine, stage
from pipeline.app.tables import (
    blank_notes,
    case_values,
    cell,
    collect,
    collect_zsre,
    headline,
    markdown,
    subset_notes,
    write_table,
    write_zsre_table,
)
from pipeline.app.tuning import Study, read_studies
from pipeline.core import files
from pipeline.core.patching import BUCKETS

log = logging.getLogger(__name__)

SWEEP_METRICS = ("S", "ES", "PS", "NS", "EM", "PM", "NM")


def layer_sweep(sweep_dir: Path, seed: int = 0) -> list[dict[str, Any]]:
    """Post-edit metrics per edited layer, from every job directory of a layer sweep."""
    rows = []
    for job in sorted(p for p in sweep_dir.glob("*") if (p / "config.yaml").exists()):
        records = read_jsonl(sorted(job.glob("cases-*.jsonl")))
        if not records:
            continue
        config = OmegaConf.load(job / "config.yaml")
        summary = summarize_records(records, seed=seed)
        mom2 = OmegaConf.select(config, "editor.mom2", default={}) or {}
        rows.append(
            {
                "layer": int(config.editor.layer),
                "statistics": {  # the budget of each layer's key statistics
                    "corpus": OmegaConf.select(config, "corpus.name"),
                    **{k: mom2.get(k) for k in ("max_tokens", "max_samples", "max_length")},
                },
                "n": summary["n_cases"],
                "post": {k: summary["post"][k] for k in SWEEP_METRICS},
                "pre": {k: summary["pre"][k] for k in SWEEP_METRICS},
                "dir": str(job),
                # per case, for the bootstrap over cases of the sweep's correlation (findings)
                "cases": {r["id"]: case_values(r, "post") for r in records},
            }
        )
    return sorted(rows, key=lambda r: r["layer"])


def budgets(rows: list[dict[str, Any]]) -> list[str]:
    """The statistics budgets of a layer sweep's jobs in words, one per distinct budget."""
    found = []
    for row in rows:
        stats = row.get("statistics") or {}
        tokens = stats.get("max_tokens")
        words = (
            (f"{tokens:,} tokens" if tokens else "no token limit")
            + f" (at most {stats.get('max_samples') or 'all'} texts"
            + f" of up to {stats.get('max_length')} tokens) of the `{stats.get('corpus')}` corpus"
        )
        if words not in found:
            found.append(words)
    return found


def with_unedited_perplexity(points: list[dict[str, Any]], run_dir: Path) -> list[dict[str, Any]]:
    """The curve's points, each given the unedited model's perplexity from the run's summary
    (where it has one): the collapse rule compares the two."""
    summary = run_dir / "summary.json"
    unedited = (
        ((files.read_json(summary).get("perplexity") or {}).get("unedited"))
        if summary.exists()
        else None
    )
    return [{**p, "unedited_perplexity": unedited} if unedited else p for p in points]


def mass_curves(data_dir: Path) -> dict[str, list[dict[str, Any]]]:
    """Each editor's mass-editing curve (`<editor>/mass/mass.json`) under one model and data."""
    return {
        path.parent.parent.name: with_unedited_perplexity(
            files.read_json(path)["curve"], path.parent
        )
        for path in sorted(data_dir.glob("*/mass/mass.json"))
    }


def sequential_curves(data_dir: Path) -> dict[str, list[dict[str, Any]]]:
    """Each editor's sequential-editing checkpoints (`<editor>/sequential/sequential.json`) as
    curve points like the mass curves': {"size": edits so far, "failed", "post": metrics}."""
    curves = {}
    for path in sorted(data_dir.glob("*/sequential/sequential.json")):
        points = files.read_json(path)["checkpoints"]
        curves[path.parent.parent.name] = with_unedited_perplexity(
            [
                {
                    "size": point["edits"],
                    "failed": point.get("failed", 0),
                    "perplexity": point.get("perplexity"),
                    "post": {
                        k: v for k, v in point.items() if isinstance(v, dict) and k != "perplexity"
                    },
                }
                for point in points
            ],
            path.parent,
        )
    return curves


def data_names(value: Any) -> list[str]:
    """A report's `mass_data` or `sequential_data`: one data name or a list of them."""
    names = [value] if isinstance(value, str) else list(value)
    if not names or len(set(names)) < len(names):
        raise ValueError(f"a scaling section's data must be distinct names, got {names}")
    return names


def scaling_points(data_dir: Path, mode: str) -> dict[str, dict[int, dict[Any, dict]]]:
    """Each case's scores at each point of each editor's curve, {editor: {size: {id: record}}},
    from `mass-<N>.jsonl` (mass) or `checkpoint-<N>.jsonl` (sequential), where the run kept
    them (sequential runs before the checkpoint files have none)."""
    prefix = "mass" if mode == "mass" else "checkpoint"
    points: dict[str, dict[int, dict[Any, dict]]] = {}
    for path in sorted(data_dir.glob(f"*/{mode}/{prefix}-*.jsonl")):
        size = int(path.stem.removeprefix(f"{prefix}-"))
        records = {r["id"]: r for r in read_jsonl([path])}
        points.setdefault(path.parent.parent.name, {})[size] = records
    return points


def generation_line(data_dir: Path, mode: str) -> str:
    """What the GE column of a scaling table measured, and the unedited model's GE there."""
    parts = []
    for path in sorted(data_dir.glob(f"*/{mode}/{mode}.json")):
        generation = files.read_json(path).get("generation") or {}
        unedited = (generation.get("unedited") or {}).get("GE")
        if unedited:
            n = len(generation.get("cases", []))
            parts.append(f"{path.parent.parent.name} {cell(unedited)} (n={n})")
    where = "; ".join(parts) if parts else "not recorded"
    return (
        "GE: fluency of samples from the generation prompts of one fixed set of cases, the same "
        f"prompts and seed at every point; the unedited model on the same prompts: {where}."
    )


def unedited_perplexity(data_dir: Path, mode: str) -> dict[str, Any] | None:
    """The unedited model's perplexity on the held-out text, from a mass or sequential
    summary under one model and data (the same for every editor there)."""
    for path in sorted(data_dir.glob(f"*/{mode}/summary.json")):
        unedited = (files.read_json(path).get("perplexity") or {}).get("unedited")
        if unedited:
            return unedited
    return None


def provenance(directory: Path, report_dir: Path) -> str:
    """Which commit and config made a results directory, as a Markdown line with links."""
    meta_path, config = directory / "run.json", directory / "config.yaml"
    meta = files.read_json(meta_path) if meta_path.exists() else {}
    summary_path = directory / "summary.json"
    seconds = (files.read_json(summary_path) if summary_path.exists() else {}).get("seconds")
    commit = (meta.get("git") or {}).get("commit") or "unknown"
    dirty = " (uncommitted changes)" if (meta.get("git") or {}).get("dirty") else ""
    link = f"[config]({os.path.relpath(config, report_dir)})" if config.exists() else "no config"
    took = f", {seconds / 60:.1f} min" if seconds is not None else ""
    sittings = meta.get("sittings") or []
    started = meta.get("started", "?")
    if len(sittings) > 1:  # a resumed run: its first start, all its sittings' time, each commit
        # A summary's time spans every sitting (the trace: its prompts' own seconds) or only the
        # last (evaluate): the larger of it and the sittings' sum is shown, the latter a lower
        # bound where a sitting stopped before it recorded a time.
        started = sittings[0].get("started") or started
        times = [s.get("seconds", s.get("seconds_so_far")) for s in sittings]
        timed = [t for t in times if t is not None]
        if timed and (seconds is None or sum(timed) >= seconds):
            at_least = "at least " if len(timed) < len(times) else ""
            took = f", {at_least}{sum(timed) / 60:.1f} min"
        commits = dict.fromkeys(f"`{(s.get('commit') or 'unknown')[:10]}`" for s in sittings)
        took += f" over {len(sittings)} sittings (commits {', '.join(commits)})"
    return (
        f"from `{os.path.relpath(directory, report_dir)}`, commit `{commit[:10]}`{dirty}, "
        f"{link}, started {started} on {describe_machine(meta)}{took}"
    )


def sweep_provenance(
    jobs: list[Path], cases: list[int], report_dir: Path, unit: str = "layers"
) -> str:
    """A sweep's jobs in one line: cases per job, every commit that ran them, their time in
    all, then the first job's provenance in full."""
    metas = [files.read_json(j / "run.json") if (j / "run.json").exists() else {} for j in jobs]
    commits = dict.fromkeys(
        f"`{((m.get('git') or {}).get('commit') or 'unknown')[:10]}`" for m in metas
    )
    seconds = [
        files.read_json(j / "summary.json").get("seconds")
        if (j / "summary.json").exists()
        else None
        for j in jobs
    ]
    took = f", {sum(seconds) / 60:.0f} min of job time in all" if None not in seconds else ""
    counts = f"{min(cases)}" if min(cases) == max(cases) else f"{min(cases)}-{max(cases)}"
    return (
        f"{len(jobs)} {unit}, {counts} cases each; jobs at commit{'s' if len(commits) > 1 else ''} "
        f"{', '.join(commits)}{took}. The first job: {provenance(jobs[0], report_dir)}."
    )


def data_files(inputs: dict[str, Path]) -> list[str]:
    """Markdown: every data file the inputs (label -> results directory) read, from their
    run.json, with its sha256 and the inputs that read it: a rerun can check its records."""
    readers: dict[tuple[str, str], list[str]] = {}
    for label, directory in inputs.items():
        meta_path = directory / "run.json"
        data = (files.read_json(meta_path) if meta_path.exists() else {}).get("data") or {}
        if data.get("path"):
            key = (data_name(data, directory), data.get("sha256") or "not recorded")
            readers.setdefault(key, []).append(label)
    lines = ["| file | sha256 | read by |", "|---|---|---|"]
    for (name, digest), labels in sorted(readers.items()):
        lines.append(f"| {name} | `{digest}` | {', '.join(labels)} |")
    return lines if readers else []


DERIVED_SUFFIX = re.compile(r"-[0-9a-f]{16}(\.\w+)$")  # the cache's key in a derived file's name
KEEP_SUFFIX = r"\1"  # the file's extension, after the key


def data_name(data: dict[str, Any], directory: Path) -> str:
    """A data file as any machine can find it: its path under the data root (the run's
    `paths.data`), or for a file derived into the cache, its name and the source files under
    the data root it was made from (their digests are in the run's run.json); never this
    machine's path."""
    path = Path(data["path"])
    if data.get("derived"):
        name = DERIVED_SUFFIX.sub(KEEP_SUFFIX, path.name)
        sources = ", ".join(f"`{source}`" for source in sorted(data.get("sources") or {}))
        return f"`{name}` (derived into the cache from {sources or 'sources not recorded'})"
    config = directory / "config.yaml"
    root = OmegaConf.select(OmegaConf.load(config), "paths.data") if config.exists() else None
    if root and path.is_relative_to(root):
        return f"`{path.relative_to(root)}`"
    if DERIVED_SUFFIX.search(path.name):  # a derived file from a run that did not name sources
        return f"`{DERIVED_SUFFIX.sub(KEEP_SUFFIX, path.name)}` (derived into the cache)"
    return f"`{path.name}`"


def software(inputs: dict[str, Path]) -> list[str]:
    """Markdown: the package versions the inputs ran with (each run.json's `packages`), one row
    per distinct set with the inputs that used it: a rerun installs these (constraints.txt)."""
    users: dict[tuple[tuple[str, str], ...], list[str]] = {}
    for label, directory in inputs.items():
        meta_path = directory / "run.json"
        packages = (files.read_json(meta_path) if meta_path.exists() else {}).get("packages")
        if packages:
            key = tuple(sorted((k, str(v)) for k, v in packages.items() if v is not None))
            users.setdefault(key, []).append(label)
    lines = ["| packages | used by |", "|---|---|"]
    for key, labels in sorted(users.items(), key=lambda item: -len(item[1])):
        versions = ", ".join(f"{name} {version}" for name, version in key)
        lines.append(f"| {versions} | {', '.join(labels)} |")
    return lines if users else []


SMALL_N = 30  # fewer traced prompts than this: the report says the averages are not reliable


def trace_facts(averages: dict[str, Any], summary: dict[str, Any]) -> list[str]:
    """Markdown: where the traced facts came from, how many, and a warning when they are few."""
    n = averages["n_prompts"]
    origin = summary.get("data_origin")
    source = summary.get("data_file") or summary.get("facts_source")
    # The file's name, not this machine's path to it (the Data section gives its sha256).
    source = Path(source).name if source else "unknown (older trace)"
    setting = [
        f"noise scale {summary['noise_scale']:.4g}" if summary.get("noise_scale") else "",
        f"{summary['samples']} corrupted copies" if summary.get("samples") else "",
        f"window {averages.get('window') or summary.get('window')}"
        if averages.get("window") or summary.get("window")
        else "",
    ]
    lines = [
        f"- **data**: `{source}`" + (f" ({origin})" if origin else ""),
        f"- **n = {n}** traced prompts"
        + (f" of {summary['facts']} facts" if summary.get("facts") else "")
        + "".join(f"; {part}" for part in setting if part),
        f"- **bucket pooling**: {POOLING_TEXT[averages.get('pooling', 'prompt')]}",
    ]
    warnings = []
    if origin == "bundled sample":
        warnings.append(
            "traced on the bundled sample (`data/samples/`, the first 300 records), not the "
            "full data set: run `make data` or set ROME_DATA"
        )
    if n < SMALL_N:
        warnings.append(
            f"only n = {n} prompts: the averages and their intervals rest on very few facts and "
            "may not show the model's pattern; trace more (`make trace`) before reading them"
        )
    for warning in warnings:  # each its own paragraph
        lines += ["", f"> **Warning:** {warning}."]
    return lines


POOLING_TEXT = {
    "prompt": "one sample per prompt and bucket (a bucket's n is the prompts that have it)",
    "paper": "the paper's notebook: middle-subject and further tokens pooled token by token, a "
    "one-token subject in both the first and the last subject bucket (n counts token rows)",
}


def _interval(stats: dict[str, Any], bucket: int | None, layer: int) -> str:
    low = stats["low"][bucket][layer] if bucket is not None else stats["low"][layer]
    high = stats["high"][bucket][layer] if bucket is not None else stats["high"][layer]
    if low is None or high is None or low != low:
        return "–"
    return f"[{low:.3f}, {high:.3f}]"


def peaks_table(averages: dict[str, Any]) -> list[str]:
    """Markdown: per kind and bucket, the layer of the largest average effect, with its interval."""
    lines = [
        "| kind | token | peak layer | AIE | 95% interval | n |",
        "|---|---|---|---|---|---|",
    ]
    window = averages.get("window") or 10
    for kind, stats in averages["kinds"].items():
        for bucket in ("last_subject", "last"):
            row = BUCKETS.index(bucket)
            mean = np.asarray(stats["mean"][row], dtype=float)
            if not np.isfinite(mean).any():
                continue
            layer = int(np.nanargmax(mean))
            where = f"{layer}" if kind == "hidden" else f"{layer} (window centre, {window} layers)"
            lines.append(
                f"| {figures.KIND_TITLES[kind]} | {figures.BUCKET_LABELS[row]} | {where} | "
                f"{mean[layer]:.3f} | {_interval(stats, row, layer)} | {stats['count'][row]} |"
            )
    if "severed" in averages:
        for name, title in (
            ("none", "hidden, nothing severed"),
            ("mlp", "hidden, MLP severed"),
            ("attn", "hidden, attention severed"),
        ):
            if name not in averages["severed"]:
                continue
            stats = averages["severed"][name]
            mean = np.asarray(stats["mean"], dtype=float)
            layer = int(np.nanargmax(mean))
            lines.append(
                f"| {title} | last subject token | {layer} | {mean[layer]:.3f} | "
                f"{_interval(stats, None, layer)} | {stats['n']} |"
            )
    return lines


def probabilities(averages: dict[str, Any]) -> list[str]:
    """Markdown: the clean and corrupted probability of the answer, with t intervals."""
    lines = ["| p(answer) | mean | 95% interval | n |", "|---|---|---|---|"]
    for name in ("clean", "corrupted"):
        stats = averages.get(name)
        if stats:
            lines.append(
                f"| {name} | {stats['mean'][0]:.3f} | {_interval(stats, None, 0)} | {stats['n']} |"
            )
    return lines


def peak_layer(averages: dict[str, Any], kind: str) -> tuple[int, float] | None:
    row = np.asarray(averages["kinds"][kind]["mean"][BUCKETS.index("last_subject")], dtype=float)
    if not np.isfinite(row).any():
        return None
    return int(np.nanargmax(row)), float(np.nanmax(row))


def paper_comparison(
    paper: dict[str, Any], table: list[dict[str, Any]], peak: tuple[int, float] | None
) -> list[str]:
    """Markdown: the paper's Table 4 rows (`paper.table4`, editor -> {S, ES, PS, NS}) beside
    ours, each as "paper / ours", and where the MLP effect peaks."""
    ours = {row["editor"]: row for row in table}
    if "none" not in ours and "none (pre)" in ours:  # unedited: the editors' own pre-edit scores
        ours["none"] = ours["none (pre)"]
    lines = []
    rows = paper.get("table4") or {}
    if rows:
        lines += [
            "| editor | " + " | ".join(f"{k} paper / ours" for k in PAPER_METRICS) + " | n ours |",
            "|---|" + "---|" * (len(PAPER_METRICS) + 1),
        ]
        for editor, numbers in rows.items():
            mine = ours.get(editor)
            cells = [
                f"{numbers[k]:.1f} / "
                + (f"{mine['metrics'][k]['mean']:.1f}" if mine else "not run")
                for k in PAPER_METRICS
            ]
            lines.append(
                f"| {editor} | " + " | ".join(cells) + f" | {mine['n'] if mine else '–'} |"
            )
        lines.append("")
    if "mlp_peak_layers" in paper:
        mine = f"layer {peak[0]} (AIE {peak[1]:.3f})" if peak else "not run"
        lines += [
            "| quantity | paper | this run |",
            "|---|---|---|",
            f"| MLP effect peak at the last subject token | {paper['mlp_peak_layers']} | {mine} |",
        ]
    return lines


PAPER_METRICS = ("S", "ES", "PS", "NS")
ZSRE_INTRO = (
    "ROME's zsRE protocol (`metrics/zsre.py`): efficacy and paraphrase are the top-1 accuracy of "
    "the new answer's tokens, teacher-forced, after the question and after its rephrasing; "
    "specificity is that of an unrelated Natural Questions question's own answer. Percent, mean "
    "[95% Wilson interval]; n cases. "
    "[Markdown](zsre_table.md) · [LaTeX](zsre_table.tex) · [CSV](zsre_table.csv)"
)


@dataclass
class Section:
    """One part of `index.md`: its Markdown lines, the figures it drew (name -> path) and what
    it could not show for want of inputs (each with the command that makes them)."""

    lines: list[str] = field(default_factory=list)
    figures: dict[str, Path] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)


def image(name: str, path: Path, out: Path) -> str:
    return f"![{name}]({os.path.relpath(path, out)})"


def read_averages(trace_dir: Path, buckets: str | None) -> dict[str, Any] | None:
    """The trace's averages pooled as `trace.buckets` asks (where the experiment sets it, as the
    paper's settings do; else the pooling the trace itself chose), or None when not traced."""
    if not (trace_dir / "averages.json").exists():
        return None
    return figures.pooled(files.read_json(trace_dir / "averages.json"), buckets)


def trace_section(
    run: Run, trace_dir: Path, averages: dict[str, Any] | None, model: str, where: str
) -> Section:
    """Causal tracing: the traced facts, where the effect peaks, p(answer), the figures."""
    out = run.out_dir
    section = Section(["## Causal tracing", ""])
    if averages is None:
        section.missing.append(f"causal trace: no `{where}/averages.json` (run `make trace`)")
        return section
    run.uses(trace_dir, "trace")  # W&B lineage: trace -> report
    examples = [files.read_json(p) for p in sorted(trace_dir.glob("example_*.json"))]
    section.figures = figures.trace_figures(out / "figures", averages, examples, model)
    summary = (
        files.read_json(trace_dir / "summary.json") if (trace_dir / "summary.json").exists() else {}
    )
    section.lines += [
        f"{averages['n_prompts']} known facts traced"
        + ("" if summary.get("complete", True) else f" ({summary.get('missing')} missing)")
        + f"; {provenance(trace_dir, out)}.",
        "",
        *trace_facts(averages, summary),
        "",
        "Where the effect peaks (the average indirect effect, restored minus corrupted "
        "p(answer), with its 95% t interval):",
        "",
        *peaks_table(averages),
        "",
        "The answer's probability before and after corrupting the subject:",
        "",
        *probabilities(averages),
        "",
    ]
    for name, path in section.figures.items():
        section.lines += [image(name, path, out), ""]
    return section


def screen_section(
    run: Run,
    screen_dir: Path,
    agreement_dir: Path,
    exact: dict[str, Any] | None,
    model: str,
) -> Section:
    """The attribution-patching screen (an estimate) over more known facts than the exact trace
    covers, and how it agrees with the exact trace where both ran (pipeline.app.agreement)."""
    out = run.out_dir
    averages = read_averages(screen_dir, None)
    if averages is None:
        return Section()
    run.uses(screen_dir, "trace")
    summary = files.read_json(screen_dir / "summary.json")
    section = Section(
        [
            f"## Attribution screen over {averages['n_prompts']:,} known facts (ESTIMATES)",
            "",
            "The same trace estimated by attribution patching (`trace.engine=attribution`, "
            "docs/tracing-attribution.md): each restored probability is the corrupted run's plus "
            "the first-order term (clean state − corrupted state) · ∂p/∂state, from one forward "
            "and one backward pass of the corrupted copies. Every number here is an estimate; "
            f"{provenance(screen_dir, out)}.",
            "",
            *trace_facts(averages, summary),
            "",
            *peaks_table(averages),
            "",
        ]
    )
    drawn = figures.trace_figures(out / "figures" / "screen", averages, [], model)
    section.figures = {f"screen_{name}": path for name, path in drawn.items()}
    for name in ("screen_average_mlp", "screen_average_attn", "screen_last_subject_aie"):
        if name in section.figures:
            section.lines += [image(name, section.figures[name], out), ""]
    section.lines += ["Its readings:", ""]
    section.lines += [f"- {f.name}: **{f.verdict}**: {f.evidence}" for f in read_trace(averages)]
    section.lines.append("")
    path = agreement_dir / "agreement.json"
    if exact is None or not path.exists():
        return section
    saved = files.read_json(path)
    section.lines += [
        "### Agreement with the exact trace",
        "",
        f"The screen over the exact trace's own {saved['facts']} facts (the same noise per "
        f"prompt, scale {saved['noise_scale']:.4g}), from `{path.name}` "
        "(`python scripts/attribution_agreement.py --save`, commit "
        f"`{((saved.get('git') or {}).get('commit') or 'not recorded')[:10]}`"
        f"{' (uncommitted changes)' if (saved.get('git') or {}).get('dirty') else ''}). "
        "Bucket averages (the "
        "(token bucket, layer) means the figures draw), estimate against exact:",
        "",
        r"| kind | linearized | r | max \|difference\| | mean \|difference\| | largest exact "
        "| peak layer at the last subject token, exact / estimate | at the last token |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for mode, estimate in saved["averages"].items():
        for row in agreement.on_averages(exact, estimate):
            peaks = row["peaks"]
            section.lines.append(
                f"| {row['kind']} | {mode} | {row['r']:.3f} | {row['max_difference']:.4f} | "
                f"{row['mean_difference']:.4f} | {row['largest_exact']:.4f} | "
                f"{peaks['last_subject']['exact']} / {peaks['last_subject']['estimate']} | "
                f"{peaks['last']['exact']} / {peaks['last']['estimate']} |"
            )
    if saved.get("exact"):
        section.lines += [
            "",
            f"Per cell, on the first {len(saved['exact'])} facts traced both ways in that run "
            "(effects, restored − corrupted; cells from the first subject token on):",
            "",
            r"| kind | linearized | r | mean \|error\| | max \|error\| | mean \|exact\| "
            "| largest mean error at |",
            "|---|---|---|---|---|---|---|",
        ]
        for mode, records in saved["estimates"].items():
            for row in agreement.per_cell(saved["exact"], records, saved["kinds"]):
                worst = row.get("worst")
                at = f"{worst['bucket']} token, layer {worst['layer']}" if worst else "–"
                section.lines.append(
                    f"| {row['kind']} | {mode} | {row['r']:.3f} | {row['mae']:.4f} | "
                    f"{row['max_error']:.4f} | {row['mean_abs_exact']:.4f} | {at} |"
                )
    speed = saved.get("speed") or {}
    if "speedup" in speed:
        section.lines += [
            "",
            f"Speed in that run ({saved.get('threads', '?')} thread): the screen "
            f"{speed['screen_prompts_per_second']:.3f} prompts/s over all {saved['facts']} facts "
            f"({speed['screen_hours_per_1000_prompts']:.2f} h per 1,000); on the prompts traced "
            f"both ways {speed['speedup']:.0f}× the exact fast engine.",
        ]
    section.lines += [
        "",
        "The readings of the exact trace and of the screen on the same facts:",
        "",
    ]
    for name, averages_of in (("exact", exact), *saved["averages"].items()):
        for f in read_trace(averages_of):
            section.lines.append(f"- {name}: {f.name}: **{f.verdict}**")
    section.lines.append("")
    return section


def read_trace(averages: dict[str, Any]) -> list[Any]:
    """The findings a trace alone speaks to (no sweep, table or curves)."""
    return findings.read_results(averages, [], [], {})


def sweep_section(
    run: Run,
    rows: list[dict[str, Any]],
    averages: dict[str, Any] | None,
    model: str,
    where: str,
) -> Section:
    """ROME by edited layer: the sweep's figure and its post-edit metrics per layer, with the
    sweep written as `layer_sweep.json`."""
    out = run.out_dir
    section = Section(["## ROME by edited layer", ""])
    if not rows:
        section.missing.append(f"layer sweep: no runs under `{where}` (run `make sweep-layers`)")
        return section
    run.write_json(
        "layer_sweep.json",
        [
            {**{k: v for k, v in r.items() if k != "cases"}, "dir": os.path.relpath(r["dir"], out)}
            for r in rows
        ],
    )
    for row in rows:
        run.uses(Path(row["dir"]), "evaluate")
    figure = figures.layer_sweep(out / "figures", rows, averages, model)
    section.figures["layer_sweep"] = figure
    section.lines += [
        sweep_provenance([Path(r["dir"]) for r in rows], [r["n"] for r in rows], out),
        "",
        *[f"Key statistics of each edited layer: {budget}." for budget in budgets(rows)],
        "",
        image("layer_sweep", figure, out),
        "",
        "After the edit, percent, mean [95% interval: Wilson for ES, PS, NS; bootstrap for S; "
        "t for the rest]:",
        "",
        "| layer | n | " + " | ".join(SWEEP_METRICS) + " |",
        "|---|---|" + "---|" * len(SWEEP_METRICS),
    ]
    for row in rows:
        cells = [cell(row["post"][k]) for k in SWEEP_METRICS]
        section.lines.append(f"| {row['layer']} | {row['n']} | " + " | ".join(cells) + " |")
    section.lines.append("")
    return section


def table_section(
    run: Run, table: list[dict[str, Any]], model: str, where: str, data: str
) -> Section:
    """CounterFact in the paper's Table 4 layout, written as table.md, .tex and .csv, and the
    rows of `data` (eval_data) as the README shows them (headline.md)."""
    out = run.out_dir
    section = Section(["## CounterFact (Table 4 layout)", ""])
    if not table:
        section.missing.append(
            f"CounterFact table: no runs of {model} under `{where}` (run `make evaluate`)"
        )
        return section
    write_table(run, table)
    same_data = [r for r in table if r["data"] == data]
    if same_data:
        files.atomic_write(run.path("headline.md"), headline(same_data))
    for directory in sorted({row["dir"] for row in table}):
        run.uses(Path(directory), "evaluate")
    section.lines += [
        "Percent, mean [95% interval: Wilson for ES, PS, NS; bootstrap for S; t for the "
        "rest]; n cases. "
        "[Markdown](table.md) · [LaTeX](table.tex) · [CSV](table.csv)",
        "",
        "Marks beside an editor (rules in `pipeline/app/tables.py`): *did not edit*: its ES "
        "is not above the same cases' unedited ES beyond the paired (Newcombe) interval, or "
        "below chance (its interval under 50%); *collapsed*: `metrics/collapse.py`; "
        "*partial*: an unfinished sharded run.",
        "",
        markdown(table),
        "",
        *[f"- {note}" for note in blank_notes(table) + subset_notes(table)],
        *[f"- {r['editor']}: {provenance(Path(r['dir']), out)}" for r in table],
        "",
    ]
    return section


def pairwise_section(run: Run, table: list[dict[str, Any]], model: str, seed: int) -> Section:
    """Editor against editor on their common cases (a subsection of the table's), written as
    pairwise.md, .tex and .csv; empty when fewer than two runs share cases."""
    found_pairs = pairwise.comparisons(table, seed=seed) if table else []
    if not found_pairs:
        return Section()
    pairwise.write(run, found_pairs)
    figure = figures.pairwise_heatmap(run.out_dir / "figures", found_pairs, model)
    return Section(
        [
            "### Editor against editor",
            "",
            "Every pair of runs on their common cases (matched by id), A minus B in "
            "percentage points: ES, PS, NS with Newcombe's paired interval and the exact "
            "McNemar test (a paired t and the sign test where cases average several "
            "prompts), S by a paired bootstrap over cases; p two-sided, Holm over the "
            "pairs of each metric; * Holm p < 0.05 (`metrics/paired.py`). "
            "[Markdown](pairwise.md) · [LaTeX](pairwise.tex) · [CSV](pairwise.csv)",
            "",
            image("pairwise", figure, run.out_dir),
            "",
            pairwise.markdown(found_pairs),
            "What this n resolves: the pairs whose difference is beyond chance after Holm's "
            "correction, per metric, and the S differences it leaves open (each with its "
            "interval: a difference inside it is not ruled out).",
            "",
            *pairwise.resolution(found_pairs),
            "",
        ],
        {"pairwise": figure},
    )


def short(value: float) -> str:
    """A tuned value as the presets write it: an integer, or three significant digits."""
    return str(value) if isinstance(value, int) else f"{value:.3g}"


def study_provenance(study: Study, out: Path) -> str:
    """The commits that ran a study's trials, its time (the cases' own seconds: a replayed
    trial rewrites its summary's time, not its cases'), and the chosen trial's provenance."""
    commits = dict.fromkeys(
        f"`{((files.read_json(t.dir / 'run.json').get('git') or {}).get('commit') or '?')[:10]}`"
        for t in study.trials
        if (t.dir / "run.json").exists()
    )
    minutes = sum(t.summary["seconds_per_case"] * t.summary["n_cases"] for t in study.trials) / 60
    return (
        f"Trials at commit{'s' if len(commits) > 1 else ''} {', '.join(commits)}, "
        f"{minutes:.0f} min of editing and scoring in all. The chosen trial: "
        f"{provenance(study.best.dir, out)}."
    )


def tuning_section(studies: list[Study], out: Path) -> Section:
    """Each editor's tuning study: the budget, every trial and the chosen point."""
    if not studies:
        return Section()
    section = Section(
        [
            "## Tuning studies",
            "",
            "Each editor's main settings for this model, chosen on cases it is not scored on "
            "(the tuning split: no case_id and no subject of the scored cases) with one budget "
            "for all (`python -m pipeline.evaluate --multirun tune=<editor>`, conf/tune/). The "
            "objective: S, or S − 100 where the paired ES change's 95% interval reaches 0 (the "
            "edit did not move the facts). The chosen trial is in bold; its values are the "
            "editor's preset for this model (conf/editor/<editor>.yaml, rounded to 3 digits).",
            "",
        ]
    )
    for study in studies:
        best, first = study.best, study.trials[0].summary["pre"]
        keys = list(dict.fromkeys(k for t in study.trials for k in t.params))
        cases = "/".join(map(str, study.cases))
        section.lines += [
            f"### {study.editor}",
            "",
            f"{len(study.trials)} trials of {cases} cases of `{study.data}`; the unedited model "
            f"on them: S {first['S']['mean']:.1f}, ES {first['ES']['mean']:.1f}, "
            f"PS {first['PS']['mean']:.1f}, NS {first['NS']['mean']:.1f}. Chosen: "
            + ", ".join(f"{k.removeprefix('editor.')} {short(best.params[k])}" for k in keys)
            + f" (objective {best.objective:.1f}). {study_provenance(study, out)}",
            "",
            "| "
            + " | ".join(k.removeprefix("editor.") for k in keys)
            + " | S | ES | PS | NS | ES change | objective |",
            "|" + "---|" * (len(keys) + 6),
        ]
        for trial in study.trials:
            post, bold = trial.summary["post"], "**" if trial is best else ""
            change = trial.summary["change"]["ES"]
            cells = [short(trial.params[k]) if k in trial.params else "–" for k in keys]
            cells += [cell(post[k]) for k in ("S", "ES", "PS", "NS")]
            cells += [cell(change), f"{trial.objective:.1f}"]
            section.lines.append("| " + " | ".join(f"{bold}{c}{bold}" for c in cells) + " |")
        section.lines.append("")
    return section


def zsre_section(run: Run, zsre_table: list[dict[str, Any]]) -> Section:
    """zsRE in ROME's layout, written as zsre_table.md, .tex and .csv; empty when not run."""
    if not zsre_table:
        return Section()
    zsre_md = write_zsre_table(run, zsre_table)["md"]
    return Section(
        [
            "## zsRE",
            "",
            ZSRE_INTRO,
            "",
            zsre_md,
            *[f"- {r['editor']}: {provenance(Path(r['dir']), run.out_dir)}" for r in zsre_table],
            "",
        ]
    )


@dataclass(frozen=True)
class Scaling:
    """How one scaling section (mass or sequential) reads: its heading, figure name, intro and
    last column."""

    mode: str
    heading: str
    name: str
    intro: str
    last: str
    value: Callable[[dict[str, Any]], Any]

    def on(self, data: str) -> Scaling:
        """The section for a further data set of this mode: its own heading and file names."""
        return replace(self, heading=f"{self.heading} on `{data}`", name=f"{self.name}_{data}")


SCALING = {
    "mass": Scaling(
        "mass",
        "Editing at scale",
        "mass_scaling",
        "N requests written into the model in one edit (ROME, FT and KN: one after another),"
        " then all N cases scored on the edited model; percent, mean [95% interval].",
        "seconds to edit",
        lambda point: point.get("edit_seconds", "–"),
    ),
    "sequential": Scaling(
        "sequential",
        "Sequential editing",
        "sequential_scaling",
        "Edits written one after another into one model, each computed on the model the "
        "edits before left; at each checkpoint every case edited so far is scored; percent, "
        "mean [95% interval]; failed: edits the editor could not make.",
        "failed",
        lambda point: point["failed"],
    ),
}


def scaling_section(
    run: Run,
    kind: Scaling,
    curves: dict[str, list[dict[str, Any]]],
    data_dir: Path,
    unedited: dict[str, Any] | None,
    model: str,
    where: Path,
    pairs: list[dict[str, Any]],
) -> Section:
    """Mass or sequential editing: metrics and perplexity against the number of edits, and
    editor against editor at each size where two editors scored the same cases."""
    out, mode, name = run.out_dir, kind.mode, kind.name
    section = Section([f"## {kind.heading}", ""])
    if not curves:
        section.missing.append(
            f"{mode} editing: no `<editor>/{mode}/{mode}.json` under "
            f"`{where}` (python -m pipeline.evaluate eval.mode={mode})"
        )
        return section
    section.figures[name] = figures.edit_scaling(
        out / "figures",
        curves,
        model,
        name=name,
        kind=f"{mode}_scaling",
        unedited=unedited["metrics"] if unedited else None,
        collapsed=findings.point_collapse,
    )
    damage = figures.perplexity_scaling(
        out / "figures",
        curves,
        model,
        name=name,
        kind=f"{mode}_scaling",
        unedited=unedited_perplexity(data_dir, mode),
    )
    if damage is not None:
        section.figures[f"{name}_perplexity"] = damage
    section.lines += [
        f"{kind.intro} Data: `{data_dir.name}`.",
        "",
        image(name, section.figures[name], out),
        "",
    ]
    if damage is not None:
        section.lines += [
            "Damage to the model: perplexity on the held-out text (the dashed line: "
            "the unedited model's); 95% intervals over the text's windows.",
            "",
            image(f"{name}_perplexity", damage, out),
            "",
        ]
    # GE where the run sampled a fixed set of cases at each point (sequential: generation_cases)
    metrics = SWEEP_METRICS + tuple(
        k for k in ("GE", "RS") if any(k in p["post"] for c in curves.values() for p in c)
    )
    if "GE" in metrics:
        section.lines += [generation_line(data_dir, mode), ""]
    section.lines += [
        "| editor | edits | " + " | ".join(metrics) + f" | {kind.last} |",
        "|---|---|" + "---|" * (len(metrics) + 1),
    ]
    for editor, curve in sorted(curves.items()):
        for point in curve:
            cells = [cell(point["post"].get(k)) for k in metrics]
            mark = " (collapsed)" if findings.point_collapse(point) else ""
            section.lines.append(
                f"| {editor}{mark} | {point['size']} | "
                + " | ".join(cells)
                + f" | {kind.value(point)} |"
            )
    section.lines += [
        "",
        *[f"- {editor}: {provenance(data_dir / editor / mode, out)}" for editor in curves],
        "",
    ]
    if pairs:
        files.atomic_write(run.path(f"{name}_pairwise.csv"), pairwise.csv_text(pairs))
        section.lines += [
            "### Editor against editor at each size",
            "",
            "Each pair of editors on the cases both scored after the same number of edits "
            "(matched by id), A minus B in percentage points, as in the pairwise table above; "
            f"Holm over the pairs of each size and metric. [CSV]({name}_pairwise.csv)",
            "",
            pairwise.scaling_markdown(pairs),
        ]
    return section


def paper_section(
    paper: dict[str, Any], same_data: list[dict[str, Any]], averages: dict[str, Any] | None
) -> Section:
    """Beside the paper: its Table 4 and MLP peak beside ours."""
    peak = peak_layer(averages, "mlp") if averages else None
    return Section(["## Beside the paper", "", *paper_comparison(paper, same_data, peak), ""])


def cost_section(runs: dict[str, Path]) -> Section:
    """What the editing runs cost (`pipeline.app.cost`), with their total."""
    costs = {label: c for label, directory in runs.items() if (c := run_cost(directory))}
    if not costs:
        return Section()
    return Section(
        [
            "## What the runs cost",
            "",
            "Compute time of each editing run as its files record it (`pipeline/app/cost.py`): "
            "for Table 4 and zsRE the sum of each case's seconds (its batch's wall time, "
            "generation included), for the curves the sum of the run's sittings.",
            "",
            *cost.markdown(costs),
            "",
        ]
    )


def inputs_section(inputs_read: dict[str, Path]) -> Section:
    """Data and Software: the data files and package versions every input ran with."""
    section = Section()
    digests = data_files(inputs_read)
    if digests:
        section.lines += ["## Data", "", *digests, ""]
    versions = software(inputs_read)
    if versions:
        section.lines += ["## Software", "", *versions, ""]
    return section


def findings_section(found: list[Any]) -> Section:
    """What the runs show: each of the paper's findings the results speak to, with a verdict."""
    if not found:
        return Section()
    return Section(
        [
            "## What the runs show",
            "",
            "Each of the paper's findings these results speak to, with a verdict by the rule in "
            "`pipeline/app/findings.py`: agrees when the effect goes the paper's way beyond the "
            "95% intervals (of the paired change where both sides are the same cases; for the "
            "layer sweep, of Spearman's ρ by a bootstrap over cases); not judged when a side "
            "did not edit or collapsed.",
            "",
            *findings.markdown(found),
            "",
        ]
    )


def snapshot_inputs(results: Path, inputs: Path, sources: list[Path]) -> dict[Path, Path]:
    """The compact inputs beside the report, and where to read each source from: an input with
    results here replaces its copy; one without keeps the copy already there (a fresh clone
    rebuilds the committed report from its committed inputs)."""
    copies = {
        s: inputs / s.resolve().relative_to(results.resolve())
        for s in sources
        if inside(s, results)
    }
    for source, copy in copies.items():
        if source.exists():
            shutil.rmtree(copy, ignore_errors=True)
    placed = snapshot(results, sources, inputs)
    for source, copy in copies.items():
        if source not in placed and copy.exists():
            log.info("no %s here: reading the report's own copy %s", source, copy)
            placed[source] = copy
    return placed


@stage("report")
def main(cfg: DictConfig, run: Run) -> None:
    out = run.out_dir
    model, seed = cfg.model.name, int(cfg.seed)
    trace_dir, runs_dir = Path(cfg.trace_dir), Path(cfg.runs_dir)
    sweep_dir = Path(cfg.sweep_dir)
    # (mode, data) of every scaling section: each mode's data in order, the first its headline
    scaling = [
        (mode, data) for mode in ("mass", "sequential") for data in data_names(cfg[f"{mode}_data"])
    ]
    first = {mode: next(d for m, d in scaling if m == mode) for mode in ("mass", "sequential")}
    one_layer_dir = Path(cfg.one_layer_trace_dir)
    tuning_dir = Path(cfg.tuning_dir)
    screen_dir, agreement_dir = Path(cfg.screen_dir), Path(cfg.agreement_dir)
    results = Path(cfg.paths.results)
    if cfg.snapshot_inputs and not inside(results, out / "inputs"):
        studies_here = sorted(tuning_dir.glob("tune-*"))
        placed = snapshot_inputs(
            results,
            out / "inputs",
            [
                trace_dir,
                runs_dir / model,
                sweep_dir,
                one_layer_dir,
                screen_dir,
                agreement_dir,
                *studies_here,
            ],
        )
        screen_dir = placed.get(screen_dir, screen_dir)
        agreement_dir = placed.get(agreement_dir, agreement_dir)
        if studies_here and studies_here[0] in placed:
            tuning_dir = placed[studies_here[0]].parent
        elif not studies_here and inside(tuning_dir, results):  # none here: the report's copies
            tuning_dir = out / "inputs" / tuning_dir.resolve().relative_to(results.resolve())
        trace_dir, sweep_dir = placed.get(trace_dir, trace_dir), placed.get(sweep_dir, sweep_dir)
        one_layer_dir = placed.get(one_layer_dir, one_layer_dir)
        if runs_dir / model in placed:
            runs_dir = placed[runs_dir / model].parent

    averages = read_averages(trace_dir, OmegaConf.select(cfg, "trace.buckets"))
    rows = layer_sweep(sweep_dir, seed=seed) if sweep_dir.exists() else []
    table = [r for r in collect(runs_dir, seed=seed) if r["model"] == model]
    zsre_table = [r for r in collect_zsre(runs_dir) if r["model"] == model]
    studies = read_studies(tuning_dir, model, seed=seed)
    data_dirs = {(mode, data): runs_dir / model / data for mode, data in scaling}
    read_curves = {"mass": mass_curves, "sequential": sequential_curves}
    curves = {key: read_curves[key[0]](data_dirs[key]) for key in scaling}
    scaling_pairs = {
        (mode, data): pairwise.scaling_comparisons(
            scaling_points(data_dirs[mode, data], mode), model, data, seed=seed
        )
        for mode, data in scaling
    }
    same_data = [r for r in table if r["data"] == cfg.eval_data]
    one_layer = (
        files.read_json(one_layer_dir / "averages.json")
        if (one_layer_dir / "averages.json").exists()
        else None
    )
    inputs_read = {"trace": trace_dir}
    if (screen_dir / "averages.json").exists():
        inputs_read["attribution screen"] = screen_dir
    inputs_read |= {f"layer {r['layer']}": Path(r["dir"]) for r in rows}
    several = len({r["data"] for r in table}) > 1  # then each run is named with its data
    editing_runs = {
        (f"{r['editor']} on {r['data']}" if several else r["editor"]): Path(r["dir"])
        for r in table
        if not r["editor"].startswith("none (")
    }
    editing_runs |= {
        f"{r['editor']} zsRE": Path(r["dir"]) for r in zsre_table if r["editor"] != "none (pre)"
    }
    for (mode, data), found_curves in curves.items():
        on = "" if data == first[mode] else f" on {data}"
        editing_runs |= {f"{e} {mode}{on}": data_dirs[mode, data] / e / mode for e in found_curves}
    inputs_read |= editing_runs
    inputs_read |= {f"{s.editor} tuning": s.best.dir for s in studies}

    sections = [
        trace_section(run, trace_dir, averages, model, cfg.trace_dir),
        screen_section(run, screen_dir, agreement_dir, averages, model),
        sweep_section(run, rows, averages, model, cfg.sweep_dir),
        table_section(run, table, model, cfg.runs_dir, cfg.eval_data),
        pairwise_section(run, table, model, seed),
        tuning_section(studies, out),
        zsre_section(run, zsre_table),
        *[
            scaling_section(
                run,
                SCALING[mode] if data == first[mode] else SCALING[mode].on(data),
                curves[mode, data],
                data_dirs[mode, data],
                next(  # the unedited model on the curve's data, where it was run there
                    (r for r in table if r["data"] == data and r["editor"].startswith("none")),
                    None,
                ),
                model,
                Path(cfg.runs_dir) / model / data,
                scaling_pairs[mode, data],
            )
            for mode, data in scaling
        ],
    ]
    if cfg.paper:
        paper = OmegaConf.to_container(cfg.paper, resolve=True)
        sections.append(paper_section(paper, same_data, averages))
    sections.append(cost_section(editing_runs))
    sections.append(inputs_section(inputs_read))
    found = findings.read_results(
        averages,
        rows,
        same_data,
        curves["mass", first["mass"]],
        curves["sequential", first["sequential"]],
        one_layer=one_layer,
        seed=seed,
        sequential_pairs=scaling_pairs["sequential", first["sequential"]],
        more=[
            findings.MoreCurves(mode, data, curves[mode, data], scaling_pairs[mode, data])
            for mode, data in scaling
            if data != first[mode]
        ],
    )
    sections.append(findings_section(found))

    title = cfg.report_title or f"{cfg.experiment_name}: {model}"
    doc = [
        f"# {title}",
        "",
        f"Generated by `python -m pipeline.report` ({provenance(out, out)}).",
        "",
    ]
    made: dict[str, Path] = {}
    missing: list[str] = []
    for section in sections:
        doc += section.lines
        made |= section.figures
        missing += section.missing
    if missing:
        doc += ["## Not yet run", "", *[f"- {m}" for m in missing], ""]
    files.atomic_write(out / "index.md", "\n".join(doc))
    run.tracker.images({f"figures/{name}": path for name, path in made.items()})  # one step
    run.write_summary(
        {
            "experiment": cfg.experiment_name,
            "model": model,
            "figures": {name: str(path) for name, path in made.items()},
            "table_rows": len(table),
            "sweep_layers": [r["layer"] for r in rows],
            "missing": missing,
        }
    )
    print(f"report: {out / 'index.md'} ({len(made)} figures, {len(table)} table rows)")
    for line in missing:
        print(f"missing: {line}")


if __name__ == "__main__":
    main()
