"""Scale-out end to end on a tiny model: shards launched by submitit, their merge, named sweeps."""

from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf

from tests.test_evaluate_stage import cases, evaluate
from tests.test_stages import merge


def without_timing(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if k not in ("seconds", "seconds_per_case")}


@pytest.mark.slow
def test_two_shards_on_submitit_local_merge_into_the_unsharded_run(tmp_path):
    evaluate(tmp_path, "data.limit=4", results="whole")
    launched = evaluate(
        tmp_path,
        "data.limit=4",
        "--multirun",
        "hydra/launcher=local",
        "shard.count=2",
        "shard.index=0,1",
        results="sharded",
    )
    assert "Submitit" in launched.stdout + launched.stderr  # ran by submitit, not in-process
    out_dir = tmp_path / "sharded/evaluate/tiny-gpt2/counterfact-easyedit/rome"
    assert sorted(p.name for p in out_dir.glob("cases-*.jsonl")) == [
        "cases-0of2.jsonl",
        "cases-1of2.jsonl",
    ]
    assert not (out_dir / "summary.json").exists()  # shards leave the summary to the merge
    merged = merge(out_dir)
    assert merged.returncode == 0, merged.stderr[-3000:]
    whole, whole_summary = cases(tmp_path, "whole")
    sharded, sharded_summary = cases(tmp_path, "sharded")
    assert sorted(whole) == sorted(sharded) and len(whole) == 4
    for case_id, row in whole.items():
        for phase in ("pre", "post"):
            assert sharded[case_id][phase]["metrics"] == pytest.approx(
                row[phase]["metrics"], abs=1e-6
            )
    assert sharded_summary["complete"] and whole_summary["complete"]
    for phase in ("pre", "post"):
        for name in ("S", "ES", "PS", "NS", "EM", "PM", "NM"):
            # percent; the shards batch their cases differently, so floats differ in the last bits
            assert sharded_summary[phase][name] == pytest.approx(
                whole_summary[phase][name], abs=1e-4
            )


def test_a_merge_with_an_unfinished_shard_names_its_missing_cases(tmp_path):
    evaluate(tmp_path, "data.limit=4", "shard.count=2", "shard.index=1", editor="none")
    out_dir = tmp_path / "results/evaluate/tiny-gpt2/counterfact-easyedit/none"
    refused = merge(out_dir)
    assert refused.returncode != 0
    assert "2 of 4 cases are not finished" in refused.stderr
    assert "shard 0 of 2: 2 cases missing (ids " in refused.stderr
    partial = merge(out_dir, "--allow-partial")
    assert partial.returncode == 0, partial.stderr[-3000:]
    summary = json.loads((out_dir / "summary.json").read_text())
    finished = json.loads((out_dir / "cases-1of2.jsonl").read_text().splitlines()[0])["id"]
    assert summary["n_cases"] == 2 and list(summary["missing_by_shard"]) == ["0"]
    assert finished not in summary["missing_by_shard"]["0"]


def test_a_named_sweep_gives_each_job_its_own_directory_and_one_group(tmp_path):
    evaluate(
        tmp_path,
        "data.limit=2",
        "--multirun",
        "sweep=named",
        "sweep_name=layers",
        "editor.layer=0,1",
    )
    sweep = tmp_path / "results/sweeps/layers/evaluate/tiny-gpt2/counterfact-easyedit/rome"
    # one directory per job, named by its non-default settings (the test's own included)
    common = "editor.context_templates=[[3,2]],editor.layer={},editor.v_num_grad_steps=4"
    jobs = [sweep / common.format(layer) for layer in (0, 1)]
    assert sorted(sweep.iterdir()) == jobs
    for layer, job in enumerate(jobs):
        config = OmegaConf.load(job / "config.yaml")
        assert config.editor.layer == layer and config.tracking.group == "sweep-layers"
        summary = json.loads((job / "summary.json").read_text())
        assert summary["n_cases"] == 2 and summary["complete"]
    assert (tmp_path / "results/sweeps/layers/logs/evaluate/multirun.yaml").exists()
