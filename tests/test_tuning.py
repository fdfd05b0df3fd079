"""Tuning studies read back from their trials (pipeline.app.tuning) and the report's section."""

from __future__ import annotations

import json

import pytest

from metrics.counterfact import case_metrics
from pipeline.app.tuning import params_of, read_studies
from pipeline.core import files
from pipeline.report import tuning_section

STUDY = "tune-ft/evaluate/tiny-gpt2/counterfact-tune/ft"


def record(case_id: int, edited: bool) -> dict:
    """A case whose new target loses before the edit and wins after it (if `edited`)."""
    before, after = (0.1, 0.9), (0.9, 0.1) if edited else (0.1, 0.9)

    def scored(pair):
        probs = {k: [pair] for k in ("rewrite", "paraphrase")} | {"neighborhood": [(0.2, 0.8)]}
        return {"probs": probs, "metrics": case_metrics(probs)}

    return {"id": case_id, "pre": scored(before), "post": scored(after), "seconds": 1}


def trial(root, name: str, edited: bool, started: str, n: int = 4, limit: int = 4) -> None:
    out = root / STUDY / name
    records = [record(i, edited) for i in range(n)]
    files.atomic_write(out / "cases-0of1.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    files.write_json(out / "run.json", {"started": started, "git": {"commit": "0123456789ab"}})
    files.atomic_write(out / "config.yaml", json.dumps({"data": {"limit": limit}}))


def test_a_trial_directory_name_gives_its_values():
    assert params_of("editor.layer=13,editor.lr=0.0047,tune=ft-l") == {
        "editor.layer": 13,
        "editor.lr": 0.0047,
    }
    assert params_of("editor.erase_scale=2.0,tune=kn") == {"editor.erase_scale": 2.0}


def test_studies_order_trials_as_they_ran_choose_the_best_and_leave_out_unfinished(tmp_path):
    trial(tmp_path, "editor.layer=3,editor.lr=0.1,tune=ft", True, "2026-01-01T00:00:02")
    trial(tmp_path, "editor.layer=1,editor.lr=0.01,tune=ft", False, "2026-01-01T00:00:01")
    trial(tmp_path, "editor.layer=2,editor.lr=0.5,tune=ft", True, "2026-01-01T00:00:03", n=2)
    (study,) = read_studies(tmp_path, "tiny-gpt2")
    assert (study.editor, study.data) == ("ft", "counterfact-tune")
    assert [t.params["editor.layer"] for t in study.trials] == [1, 3]  # layer 2: 2 of 4 cases
    unedited, edited = study.trials
    # The trial that did not move ES scores S - 100 (pipeline.app.stage.headline); the edit wins.
    assert unedited.objective == pytest.approx(unedited.summary["post"]["S"]["mean"] - 100)
    assert study.best is edited and study.cases == [4]
    section = "\n".join(tuning_section([study], tmp_path).lines)
    assert "2 trials of 4 cases of `counterfact-tune`" in section
    assert "Chosen: layer 3, lr 0.1" in section
    assert "| **3** | **0.1** |" in section and "| 1 | 0.01 |" in section


def test_no_studies_no_section(tmp_path):
    assert read_studies(tmp_path, "tiny-gpt2") == []
    assert tuning_section([], tmp_path).lines == []
