"""Table cells print the interval's own ends, so asymmetric and clipped intervals read right."""

import json
import math

from metrics.counterfact import case_metrics
from pipeline.app import tables
from pipeline.app.tables import cell, collect, csv_text, label, latex, markdown, partial_run
from pipeline.core import files
from tests.test_stages import run_stage


def test_cell_prints_low_and_high_not_a_half_width():
    # Wilson for 199 of 200: asymmetric about the mean; "± 1.3" would claim 100.8 is possible.
    metric = {"mean": 99.5, "low": 97.22, "high": 99.91, "n": 200}
    assert cell(metric) == "99.5 [97.2, 99.9]"
    assert cell({"mean": 25.0, "low": 0.0, "high": 75.0, "n": 4}) == "25.0 [0.0, 75.0]"
    assert cell({"mean": 3.0, "low": math.nan, "high": math.nan, "n": 1}) == "3.0"
    assert cell(None) == "–" and cell({"mean": math.nan, "n": 0}) == "–"


def test_tables_carry_the_interval_in_every_format():
    metrics = {"ES": {"mean": 99.5, "low": 97.22, "high": 99.91, "n": 200}}
    table = [{"model": "m_1", "data": "cf", "editor": "rome", "n": 200, "metrics": metrics}]
    assert "| 99.5 [97.2, 99.9] |" in markdown(table)
    assert "99.5 [97.2, 99.9]" in latex(table) and "m\\_1" in latex(table)
    assert "±" not in markdown(table) + latex(table)
    assert "99.5,97.22,99.91,200" in csv_text(table)


def write_run(directory, cases, shard="0of1", summary=None):
    """A run directory as evaluate leaves it: per-case lines, and summary.json once aggregated."""
    directory.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(c) + "\n" for c in cases)
    (directory / f"cases-{shard}.jsonl").write_text(text)
    if summary is not None:
        files.write_json(directory / "summary.json", summary)


def case(case_id, new_wins, before=False):
    def scored(wins):
        probs = {k: [(0.6, 0.4) if wins else (0.4, 0.6)] for k in ("rewrite", "paraphrase")}
        probs["neighborhood"] = [(0.4, 0.6)]
        return {"probs": probs, "metrics": case_metrics(probs)}

    return {"id": case_id, "pre": scored(before), "post": scored(new_wins), "seconds": 1}


def test_a_sharded_run_is_partial_until_merged_and_when_merged_partially(tmp_path):
    run = tmp_path / "m/cf/rome"
    write_run(run, [case(i, True) for i in range(0, 8, 2)], shard="0of2")
    assert "1 of 2 shards" in partial_run(run, 4)
    files.write_json(run / "summary.json", {"complete": False, "missing": 4, "n_cases": 4})
    assert "--allow-partial" in partial_run(run, 4)
    files.write_json(run / "summary.json", {"complete": True, "n_cases": 8})
    assert partial_run(run, 8) is None
    assert "8 when merged" in partial_run(run, 9)  # a shard went on after the merge
    single = tmp_path / "m/cf/none"
    write_run(single, [case(i, False) for i in range(4)])
    assert partial_run(single, 4) is None  # one job: what is on disk is the run


def test_did_not_edit_is_no_paired_gain_or_es_below_chance(tmp_path):
    write_run(tmp_path / "m/cf/none", [case(i, False) for i in range(40)])
    write_run(tmp_path / "m/cf/rome", [case(i, True) for i in range(40)])
    write_run(tmp_path / "m/cf/ft-l", [case(i, i < 8) for i in range(40)])  # 8 of 40 move
    write_run(tmp_path / "m/cf/kn", [case(i, i < 2) for i in range(40)])  # 2 of 40 move
    write_run(tmp_path / "m/cf/memit", [case(i, i < 18) for i in range(40)])  # 45%, not below
    # Edited before already, 30 of 40: above chance, but no gain.
    write_run(tmp_path / "m/cf/ft", [case(i, i < 30, before=i < 30) for i in range(40)])
    table = {r["editor"]: r for r in collect(tmp_path)}
    assert table["ft-l"]["edit_effect"]["low"] > 0  # significant, yet ES 20% is below chance
    assert label(table["ft-l"]) == "ft-l (did not edit)"
    assert not table["kn"]["edit_effect"]["low"] > 0 and label(table["kn"]) == "kn (did not edit)"
    assert table["ft"]["metrics"]["ES"]["low"] > 50 and label(table["ft"]) == "ft (did not edit)"
    assert table["memit"]["metrics"]["ES"]["high"] > 50 and label(table["memit"]) == "memit"
    assert label(table["rome"]) == "rome" and label(table["none"]) == "none"
    assert "ft-l (did not edit)" in markdown(list(table.values()))
    lines = csv_text(list(table.values())).splitlines()
    assert lines[0].endswith(",marks") and lines[2].endswith(",did not edit")


def test_summarize_refuses_an_unmerged_sharded_run_unless_allowed(tmp_path):
    runs = tmp_path / "evaluate"
    write_run(runs / "tiny-gpt2/cf/none", [case(i, False) for i in range(40)], summary={})
    write_run(runs / "tiny-gpt2/cf/rome", [case(i, True) for i in range(0, 40, 2)], shard="0of2")
    args = (f"runs_dir={runs}", f"out_dir={tmp_path / 'summary'}")
    refused = run_stage("summarize", *args)
    assert refused.returncode != 0 and "1 of 2 shards" in refused.stderr + refused.stdout
    assert not (tmp_path / "summary/table.md").exists()
    allowed = run_stage("summarize", *args, "allow_partial=true")
    assert allowed.returncode == 0, allowed.stderr[-3000:]
    assert "| rome (partial) | 20 |" in (tmp_path / "summary/table.md").read_text()
    assert "rome (partial) − none" in (tmp_path / "summary/pairwise.md").read_text()


def test_ge_on_fewer_cases_than_its_row_says_on_how_many():
    def row(editor, n, generated):
        return {"editor": editor, "n": n, "metrics": {"GE": {"mean": 6.0, "n": generated}}}

    rows = [row("none", 1000, 200), row("rome", 1000, 200), row("kn", 20, 20), row("ft", 500, 100)]
    assert tables.subset_notes(rows) == [
        "GE is over the first 200 of the 1,000 cases in none, rome (`eval.generation_cases=200`): "
        "sampling a case's generation prompts is the costliest part of evaluating it.",
        "GE is over the first 100 of the 500 cases in ft (`eval.generation_cases=100`): "
        "sampling a case's generation prompts is the costliest part of evaluating it.",
    ]


def test_blank_columns_are_explained_rs_by_its_missing_files():
    measured = {"mean": 5.0, "low": 4.0, "high": 6.0, "n": 3}
    rows = [
        {"editor": "none", "metrics": {"GE": measured, "PPL": measured}},
        {"editor": "rome", "metrics": {"GE": measured}},
    ]
    notes = tables.blank_notes(rows)
    assert len(notes) == 2  # GE is filled in both rows: no note
    assert notes[0].startswith("RS is blank in every row: RS needs ROME's tf-idf")
    assert notes[1].startswith("PPL is blank in rome: the run measured no perplexity")
