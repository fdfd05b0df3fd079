"""The report from small fixture results: every figure non-blank, the table whole, links resolve."""

from __future__ import annotations

import csv
import json
import re
import shutil

import numpy as np
from PIL import Image

from metrics.counterfact import case_metrics
from pipeline.app.results import summarize_records
from pipeline.app.tables import COLUMNS
from pipeline.core import files
from pipeline.trace import aggregate
from tests.test_stages import run_stage

LAYERS, KINDS = 6, ("hidden", "mlp", "attn")


def trace_record(rng, fact_id: int) -> dict:
    tokens = ["The", " Eiffel", " Tower", " is", " in"]
    grid = lambda: rng.uniform(0.0, 0.5, size=(len(tokens), LAYERS)).tolist()  # noqa: E731
    return {
        "id": fact_id,
        "prompt": "".join(tokens),
        "subject": "Eiffel Tower",
        "tokens": tokens,
        "subject_span": [1, 3],
        "answer": " Paris",
        "answer_ids": [7],
        "seed": 0,
        "window": 2,
        "clean": 0.6,
        "corrupted": 0.05,
        "kinds": {kind: grid() for kind in KINDS},
        "severed": {name: rng.uniform(0, 0.3, LAYERS).tolist() for name in ("none", "mlp", "attn")},
        "severed_token": 2,
    }


def case_record(rng, case_id: int, edited: bool) -> dict:
    def scored(lift):
        probs = {
            kind: [(float(rng.uniform(lift, 1)), float(rng.uniform(0, 1)))]
            for kind in ("rewrite", "paraphrase", "neighborhood")
        }
        return {"probs": probs, "metrics": case_metrics(probs)}

    return {"id": case_id, "pre": scored(0.0), "post": scored(0.5 if edited else 0.0), "seconds": 1}


def run_dir(path, config: dict) -> None:
    files.write_json(path / "run.json", {"stage": "x", "git": {"commit": "0123456789abcdef"}})
    files.atomic_write(path / "config.yaml", json.dumps(config))


def write_fixtures(results):
    rng = np.random.default_rng(0)
    trace = results / "trace/tiny-gpt2/known_1000"
    records = [trace_record(rng, i) for i in range(5)]
    files.write_json(trace / "averages.json", aggregate(records, list(KINDS)))
    files.write_json(trace / "example_0.json", records[0])
    summary = {"complete": True, "facts": 5, "data_origin": "bundled sample"}
    files.write_json(trace / "summary.json", {**summary, "data_file": "samples/known.json"})
    run_dir(trace, {"model": {"name": "tiny-gpt2"}})
    # An attribution screen over more facts, and its agreement with the exact trace.
    screen = results / "trace/tiny-gpt2/known-union-attribution"
    estimated = [{**trace_record(rng, i), "estimate": True} for i in range(8)]
    files.write_json(screen / "averages.json", aggregate(estimated, list(KINDS)))
    files.write_json(screen / "summary.json", {**summary, "facts": 8})
    run_dir(screen, {"model": {"name": "tiny-gpt2"}})
    agreement = {
        "facts": 5,
        "kinds": list(KINDS),
        "noise_scale": 0.1,
        "averages": {"prob": aggregate(estimated[:5], list(KINDS))},
        "exact": records[:2],
        "estimates": {"prob": estimated[:2]},
        "speed": {
            "speedup": 40.0,
            "screen_prompts_per_second": 0.3,
            "screen_hours_per_1000_prompts": 0.9,
        },
        "threads": 1,
    }
    files.write_json(trace.parent / "known_1000-attribution-agreement/agreement.json", agreement)
    for editor in ("rome", "none"):
        out = results / "evaluate/tiny-gpt2/cf" / editor
        cases = [case_record(rng, i, editor == "rome") for i in range(8)]
        files.atomic_write(out / "cases-0of1.jsonl", "".join(json.dumps(c) + "\n" for c in cases))
        run_dir(out, {"editor": {"name": editor}})
    for editor, lift in (("memit", True), ("rome", False)):  # mass editing: N cases at once
        curve = [
            {
                "size": n,
                "edit_seconds": n,
                "perplexity": {"mean": 20.0 + n, "low": 19.0 + n, "high": 22.0 + n, "n": 9},
                **summarize_records([case_record(rng, i, lift) for i in range(n)]),
            }
            for n in (1, 4, 8)
        ]
        mass = results / f"evaluate/tiny-gpt2/cf/{editor}/mass"
        files.write_json(mass / "mass.json", {"curve": curve})
        unedited = {"mean": 20.0, "low": 19.0, "high": 21.0, "n": 9}
        files.write_json(mass / "summary.json", {"perplexity": {"unedited": unedited}})
    for editor in ("memit", "rome"):  # sequential editing: checkpoints as the stage writes them
        checkpoints = [
            {
                "edits": n,
                "failed": 0,
                **summarize_records([case_record(rng, i, True) for i in range(n)])["post"],
            }
            for n in (1, 4, 8)
        ]
        saved: dict = {"checkpoints": checkpoints}
        if editor == "memit":  # GE on one fixed case at each checkpoint (eval.generation_cases)
            for n, point in zip((1, 4, 8), checkpoints, strict=True):
                point["GE"] = {"mean": 6.0 - n / 10, "low": 5.0, "high": 6.5, "n": 2}
            unedited_ge = {"mean": 6.1, "low": 5.9, "high": 6.3, "n": 2}
            saved["generation"] = {"cases": [0, 1], "unedited": {"GE": unedited_ge}}
        files.write_json(
            results / f"evaluate/tiny-gpt2/cf/{editor}/sequential/sequential.json", saved
        )
    for layer in range(LAYERS):
        out = results / f"sweeps/layers/evaluate/tiny-gpt2/cf/rome/editor.layer={layer}"
        cases = [case_record(rng, i, layer < 3) for i in range(4)]
        files.atomic_write(out / "cases-0of1.jsonl", "".join(json.dumps(c) + "\n" for c in cases))
        mom2 = {"max_tokens": 100000, "max_samples": 100000, "max_length": 256}
        run_dir(out, {"editor": {"layer": layer, "mom2": mom2}, "corpus": {"name": "wikipedia"}})


def report(tmp_path, *overrides):
    done = run_stage(
        "report",
        "model=tiny-gpt2",
        "eval_data=cf",
        f"paths.results={tmp_path / 'results'}",
        f"paths.reports={tmp_path / 'reports'}",
        *overrides,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done, tmp_path / "reports/default_smollm2"


def test_report_from_fixture_results(tmp_path):
    write_fixtures(tmp_path / "results")
    done, out = report(
        tmp_path,
        "paper={table4: {none: {S: 30.5, ES: 22.2, PS: 24.7, NS: 78.1}, "
        "rome: {S: 89.2, ES: 100.0, PS: 96.4, NS: 75.4}, kn: {S: 35.6, ES: 28.7, PS: 28.0, "
        "NS: 72.9}}, mlp_peak_layers: 'layers 15-17'}",
    )
    assert "missing:" not in done.stdout
    index = (out / "index.md").read_text()
    screen = index.split("## Attribution screen over 8 known facts (ESTIMATES)")[1]
    screen = screen.split("\n## ")[0]
    assert "ESTIMATED by attribution patching" in screen  # its readings say so
    assert "| mlp | prob |" in screen and "on the first 2 facts traced both ways" in screen
    assert "40× the exact fast engine" in screen
    assert (out / "figures/screen/average_mlp.png").exists()
    names = {p.stem for p in (out / "figures").glob("*.png")}
    assert {"example_0_hidden", "example_0_mlp", "example_0_attn", "average_mlp"} <= names
    assert {"last_subject_aie", "severed", "layer_sweep", "mass_scaling"} <= names
    assert "sequential_scaling" in names
    # Damage beside the scores where the curves carry perplexity (mass here, not sequential).
    assert "mass_scaling_perplexity" in names and "sequential_scaling_perplexity" not in names
    for png in (out / "figures").glob("*.png"):
        image = Image.open(png)
        assert image.size[0] > 300 and image.size[1] > 200, png.name
        assert len(set(image.convert("L").getdata())) > 10, f"{png.name} is blank"
    header = (out / "table.md").read_text().splitlines()[0]
    assert all(f" {c} " in header for c in COLUMNS)
    assert len((out / "table.csv").read_text().splitlines()) == 3  # header, unedited, rome
    index = (out / "index.md").read_text()
    links = re.findall(r"\]\(([^)]+)\)", index)
    assert len(links) >= 12
    for link in links:
        assert (out / link).exists(), f"broken link {link}"
    resolves = index.split("What this n resolves")[1].split("\n## ")[0]
    assert "- cf (tiny-gpt2, n = 8 cases per pair): resolved (Holm p < 0.05) S " in resolves
    cost = index.split("## What the runs cost")[1].split("\n## ")[0]
    assert "| rome | 0.00 | 8 | 1.0 | per-case seconds | ? |" in cost  # 8 cases of 1 s each
    findings = index.split("## What the runs show")[1]
    assert "**Early site: MLP at the last subject token**" in findings
    assert "**MEMIT holds up where ROME's edits pile up**" in findings
    # The paper's Table 4 rows beside ours: "paper / ours" per metric, "not run" where we have none.
    ours = {row["editor"]: row for row in csv.DictReader((out / "table.csv").open())}
    rome_s = float(ours["rome"]["S_mean"])
    assert f"| rome | 89.2 / {rome_s:.1f} | 100.0 / " in index
    none_s = float(ours["none"]["S_mean"])
    assert f"| none | 30.5 / {none_s:.1f} |" in index
    assert "| kn | 35.6 / not run | 28.7 / not run |" in index
    assert "| MLP effect peak" in index
    sequential = index.split("## Sequential editing")[1].split("\n## ")[0]
    assert "| editor | edits | S | ES | PS | NS | EM | PM | NM | GE | failed |" in sequential
    assert "the same prompts: memit 6.1 [5.9, 6.3] (n=2)" in sequential
    assert "| 5.2 [5.0, 6.5] | 0 |" in sequential  # memit's GE after 8 edits
    assert (
        sum(line.startswith(("| memit | ", "| rome | ")) for line in sequential.splitlines()) == 6
    )
    sweep = json.loads((out / "layer_sweep.json").read_text())
    assert [row["layer"] for row in sweep] == list(range(LAYERS))
    assert (
        "Key statistics of each edited layer: 100,000 tokens (at most 100000 texts of up to 256 "
        "tokens) of the `wikipedia` corpus." in index
    )
    # Where the trace came from, how many, and a warning for both a sample and a small n.
    assert "- **data**: `known.json` (bundled sample)" in index  # a name, not a path
    assert "**n = 5** traced prompts of 5 facts" in index
    assert "traced on the bundled sample" in index and "only n = 5 prompts" in index
    assert "one sample per prompt and bucket" in index
    peaks = json.loads((out.parent.parent / "results/trace/tiny-gpt2/known_1000/averages.json")
                       .read_text())["kinds"]["mlp"]["mean"][2]  # fmt: skip
    layer = int(np.argmax(peaks))
    assert re.search(
        rf"\| MLP output \| last subject token \| {layer} \(window centre, 2 layers\) \| "
        rf"{peaks[layer]:.3f} \| \[-?\d\.\d{{3}}, \d\.\d{{3}}\] \| 5 \|",
        index,
    )
    assert "| hidden, MLP severed | last subject token |" in index
    assert "| clean | 0.600 |" in index and "| corrupted | 0.050 |" in index
    assert re.search(r"\| memit \| 8 \| [\d.]+ \[[\d.]+, [\d.]+\] \|", index)  # mass editing
    # The sweep's table prints intervals too.
    assert re.search(r"\| 0 \| 4 \| [\d.]+ \[[\d.]+, [\d.]+\] \|", index)


def test_report_draws_the_papers_pooling_when_asked(tmp_path):
    write_fixtures(tmp_path / "results")
    _, out = report(tmp_path, "+trace.buckets=paper")
    index = (out / "index.md").read_text()
    assert "the paper's notebook: middle-subject and further tokens pooled" in index


def test_report_lists_what_has_not_been_run(tmp_path):
    (tmp_path / "results").mkdir()
    done, out = report(tmp_path)
    assert done.stdout.count("missing:") == 5  # trace, layer sweep, table, mass, sequential
    assert "run `make sweep-layers`" in (out / "index.md").read_text()


def test_a_report_rebuilds_from_its_own_inputs_identically(tmp_path):
    """The report copies its inputs' small files beside itself and reads only those: rebuilt
    from that copy alone (the results gone), its tables and index are the same files."""
    write_fixtures(tmp_path / "results")
    _, out = report(tmp_path)
    inputs = out / "inputs"
    assert (inputs / "trace/tiny-gpt2/known_1000/averages.json").exists()
    assert (inputs / "evaluate/tiny-gpt2/cf/rome/mass/mass.json").exists()
    assert len(list(inputs.glob("sweeps/layers/evaluate/tiny-gpt2/cf/rome/*/cases-*.jsonl"))) == 6
    written = {
        name: (out / name).read_text()
        for name in ("table.md", "table.tex", "table.csv", "layer_sweep.json", "index.md")
    }
    moved = tmp_path / "elsewhere"  # another checkout: nothing may depend on the old paths
    shutil.move(out, moved)
    shutil.rmtree(tmp_path / "results")
    done = run_stage(
        "report",
        "model=tiny-gpt2",
        "eval_data=cf",
        f"paths.results={moved / 'inputs'}",
        f"paths.reports={tmp_path / 'again'}",
        f"out_dir={moved}",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "missing:" not in done.stdout
    for name, text in written.items():
        again = (moved / name).read_text()
        if name == "index.md":  # its first lines name the report run itself (time, commit)
            text, again = (t.split("\n", 3)[3] for t in (text, again))
        assert again == text, name
    # A fresh clone: no results at all, the default snapshot on. The report keeps its own
    # inputs (none of them has results to replace it) and writes the same files again.
    done = run_stage(
        "report",
        "model=tiny-gpt2",
        "eval_data=cf",
        f"paths.results={tmp_path / 'fresh-clone-results'}",
        f"out_dir={moved}",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "missing:" not in done.stdout
    assert (moved / "inputs/evaluate/tiny-gpt2/cf/rome/mass/mass.json").exists()
    for name, text in written.items():
        again = (moved / name).read_text()
        if name == "index.md":
            text, again = (t.split("\n", 3)[3] for t in (text, again))
        assert again == text, name


def test_scaling_curves_read_their_own_data_and_pair_the_editors_at_each_size(tmp_path):
    """`sequential_data` apart from `eval_data` (AlphaEdit's setting runs on more cases than
    Table 4), and editor against editor at each size from each case's scores there."""
    results = tmp_path / "results"
    write_fixtures(results)
    rng = np.random.default_rng(1)
    for editor in ("memit", "rome"):
        moved = results / f"evaluate/tiny-gpt2/cf-union/{editor}/sequential"
        moved.parent.mkdir(parents=True)
        shutil.move(results / f"evaluate/tiny-gpt2/cf/{editor}/sequential", moved)
        for n in (1, 4, 8):
            for name in (f"checkpoint-{n}.jsonl", f"../../../cf/{editor}/mass/mass-{n}.jsonl"):
                cases = [case_record(rng, i, True) for i in range(n)]
                lines = "".join(json.dumps(c) + "\n" for c in cases)
                files.atomic_write((moved / name).resolve(), lines)
    done, out = report(tmp_path, "sequential_data=cf-union")
    assert "missing:" not in done.stdout
    index = (out / "index.md").read_text()
    for heading, data in (("Editing at scale", "cf"), ("Sequential editing", "cf-union")):
        section = index.split(f"## {heading}")[1].split("\n## ")[0]
        assert f"Data: `{data}`." in section
        pairs = section.split("### Editor against editor at each size")[1]
        assert "| 8 | memit − rome | 8 |" in pairs  # Table 4's order: the successor first
        assert "| 1 | memit − rome | 1 |" not in pairs  # one case: no pair
    assert (out / "sequential_scaling_pairwise.csv").read_text().startswith("model,data,size,")
    assert "inputs/evaluate/tiny-gpt2/cf-union/memit/sequential" in index


def test_data_files_are_named_under_the_data_root_never_by_this_machines_path(tmp_path):
    from pipeline.report import data_name

    run = tmp_path / "run"
    files.atomic_write(run / "config.yaml", "paths:\n  data: /somewhere/data\n")
    plain = {"path": "/somewhere/data/counterfact_easyedit/counterfact-edit.json"}
    assert data_name(plain, run) == "`counterfact_easyedit/counterfact-edit.json`"
    derived = {
        "path": "/home/me/.cache/data/counterfact-first1000-7f5add3eadad37c5.json",
        "derived": True,
        "sources": {"counterfact_full/b.jsonl": "1", "counterfact_full/a.jsonl": "2"},
    }
    assert data_name(derived, run) == (
        "`counterfact-first1000.json` (derived into the cache from "
        "`counterfact_full/a.jsonl`, `counterfact_full/b.jsonl`)"
    )
    elsewhere = {"path": "/tmp/mine.json"}  # outside the data root: its name alone
    assert data_name(elsewhere, run) == "`mine.json`"
    unnamed = {"path": "/home/me/.cache/data/known-union-aa9469be6be7043b.json"}  # no sources
    assert data_name(unnamed, run) == "`known-union.json` (derived into the cache)"


def test_a_resumed_runs_provenance_gives_its_first_start_and_all_its_sittings_time(tmp_path):
    from pipeline.report import provenance

    run = tmp_path / "run"
    sittings = [
        {"started": "2026-12-01T10:00:00+0000", "commit": "a" * 40, "dirty": False},  # killed
        {"started": "2026-12-02T10:00:00+0000", "commit": "b" * 40, "seconds": 600.0},
        {"started": "2026-12-03T10:00:00+0000", "commit": "b" * 40, "seconds": 120.0},
    ]
    meta = {"git": {"commit": "b" * 40}, "started": sittings[-1]["started"], "sittings": sittings}
    files.atomic_write(run / "run.json", json.dumps(meta))
    files.atomic_write(run / "summary.json", json.dumps({"seconds": 120.0}))  # the last sitting's
    line = provenance(run, tmp_path)
    # 600 + 120 s of the timed sittings; the first, stopped before it recorded a time, makes the
    # total a lower bound.
    assert "started 2026-12-01T10:00:00+0000" in line
    assert line.endswith(", at least 12.0 min over 3 sittings (commits `aaaaaaaaaa`, `bbbbbbbbbb`)")
    sittings[0]["seconds_so_far"] = 60.0  # saved progress before it stopped: counted
    files.atomic_write(run / "run.json", json.dumps(meta))
    assert provenance(run, tmp_path).endswith(
        ", 13.0 min over 3 sittings (commits `aaaaaaaaaa`, `bbbbbbbbbb`)"
    )
    # A summary whose time already spans the sittings (the trace's prompts' seconds) is shown.
    files.atomic_write(run / "summary.json", json.dumps({"seconds": 3000.0}))
    assert provenance(run, tmp_path).endswith(
        ", 50.0 min over 3 sittings (commits `aaaaaaaaaa`, `bbbbbbbbbb`)"
    )


def test_a_scaling_mode_on_several_data_has_a_section_each_and_reads_a_claim_on_one(tmp_path):
    """`mass_data=[a, b]`: the full-schema curves first, an earlier data's curve (ROME's on the
    reduced schema) after, each its own section; the MEMIT-against-ROME claim is read on the
    first data holding both editors, never across two, and says which."""
    results = tmp_path / "results"
    write_fixtures(results)
    union = results / "evaluate/tiny-gpt2/cf-union/memit/mass"
    shutil.copytree(results / "evaluate/tiny-gpt2/cf/memit/mass", union)  # no ROME on cf-union
    for mass in (union, results / "evaluate/tiny-gpt2/cf/memit/mass"):  # timed, for the costs
        files.write_json(mass / "run.json", {"sittings": [{"started": "x", "seconds": 60.0}]})
    done, out = report(tmp_path, "mass_data=[cf-union,cf]")
    assert "missing:" not in done.stdout
    index = (out / "index.md").read_text()
    first = index.split("## Editing at scale\n")[1].split("\n## ")[0]
    assert "Data: `cf-union`." in first and "| rome |" not in first
    further = index.split("## Editing at scale on `cf`\n")[1].split("\n## ")[0]
    assert "Data: `cf`." in further and "| rome | 8 |" in further
    assert "](figures/mass_scaling_cf" in further
    claim = next(line for line in index.splitlines() if "MEMIT holds up" in line)
    assert claim.endswith("(on `cf`).")
    assert "| memit mass on cf |" in index and "| memit mass |" in index  # the cost table
    done = run_stage(
        "report",
        "model=tiny-gpt2",
        "mass_data=[cf,cf]",
        f"paths.results={results}",
        f"paths.reports={tmp_path / 'again'}",
    )
    assert done.returncode != 0 and "distinct" in done.stderr
