"""A run's cost from its own files: per-case seconds where it keeps them, else its sittings."""

import json

import pytest

from pipeline.app.cost import markdown, run_cost
from pipeline.core import files


def test_an_independent_run_costs_the_sum_of_its_cases_seconds_over_any_sittings(tmp_path):
    lines = [{"id": i, "seconds": 1.5 + i} for i in range(4)]
    files.atomic_write(
        tmp_path / "cases-0of2.jsonl", "".join(json.dumps(r) + "\n" for r in lines[:2])
    )
    files.atomic_write(
        tmp_path / "cases-1of2.jsonl", "".join(json.dumps(r) + "\n" for r in lines[2:])
    )
    # Three sittings, two of them stopped: the cases' own seconds count, not the sittings'.
    sittings = [{"started": "a"}, {"started": "b"}, {"started": "c", "seconds": 1.0}]
    files.write_json(tmp_path / "run.json", {"sittings": sittings, "machine": {"torch_threads": 1}})
    cost = run_cost(tmp_path)
    assert cost == {"seconds": 12.0, "cases": 4, "basis": "per-case seconds", "untimed": 0,
                    "threads": 1}  # fmt: skip


def test_a_curve_costs_its_sittings_and_says_when_one_went_untimed(tmp_path):
    sittings = [{"seconds_so_far": 3600.0}, {"seconds": 1800.0}]  # one stopped, one finished
    files.write_json(tmp_path / "run.json", {"sittings": sittings})
    cost = run_cost(tmp_path)
    assert cost["seconds"] == 5400.0 and cost["untimed"] == 0 and cost["cases"] is None
    files.write_json(tmp_path / "run.json", {"sittings": [{}, *sittings]})
    cost = run_cost(tmp_path)
    assert cost["untimed"] == 1 and cost["basis"] == "3 sittings"
    table = markdown({"memit sequential": cost})
    assert (
        table[2]
        == "| memit sequential | 1.50 | – | – | 3 sittings, 1 untimed (a lower bound) | ? |"
    )
    assert table[-1] == "| **all** | **1.5** (a lower bound) | | | | |"
    files.write_json(tmp_path / "run.json", {"sittings": [{}]})
    assert run_cost(tmp_path) is None  # no time recorded at all


def test_the_sitting_time_so_far_is_recorded_where_protocols_save(tmp_path):
    """`Run.note_time` writes the running sitting's seconds into run.json."""
    from pipeline.app.stage import Run

    run = Run.__new__(Run)  # only what note_time reads: its directory, meta and start
    run.out_dir, run.started = tmp_path, 0.0
    run.meta = {"sittings": [{"started": "x"}]}
    run.note_time()
    saved = json.loads((tmp_path / "run.json").read_text())
    assert saved["sittings"][0]["seconds_so_far"] == pytest.approx(
        run.meta["sittings"][0]["seconds_so_far"]
    )
    assert saved["sittings"][0]["seconds_so_far"] > 1e9  # since the epoch here: started = 0


def test_a_run_from_before_sittings_is_one_sitting_timed_by_its_summary(tmp_path):
    files.write_json(tmp_path / "run.json", {"started": "2026-12-01"})
    files.write_json(tmp_path / "summary.json", {"seconds": 7200.0})
    cost = run_cost(tmp_path)
    assert cost["seconds"] == 7200.0 and cost["untimed"] == 0 and cost["basis"] == "1 sitting"
