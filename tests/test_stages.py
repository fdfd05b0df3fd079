"""The Hydra app end to end, as a user runs it: `python -m pipeline.<stage> [overrides]`."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import CACHE, ROOT


def stage_process(stage: str, *overrides: str, env: dict | None = None, **popen) -> dict:
    """The arguments of `python -m pipeline.<stage> overrides...` from the repository root, W&B
    off, for subprocess.run or Popen."""
    return dict(
        args=[sys.executable, "-m", f"pipeline.{stage}", *overrides],
        cwd=ROOT,
        env={**os.environ, "ROME_CACHE": str(CACHE), "ROME_WANDB_MODE": "disabled", **(env or {})},
        text=True,
        **popen,
    )


def run_stage(stage: str, *overrides: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        **stage_process(stage, *overrides, env=env, capture_output=True), timeout=900
    )


def merge(directory, *args: str) -> subprocess.CompletedProcess:
    """`python -m pipeline.merge directory args...`."""
    return run_stage("merge", str(directory), *args)


def last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


def test_known_stage_writes_results_and_metadata(tmp_path):
    done = run_stage(
        "known",
        "model=tiny-gpt2",
        "data.limit=20",
        f"paths.results={tmp_path}",
        "seed=3",
        "tracking.mode=offline",
        env={"ROME_WANDB_MODE": "offline"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out_dir = tmp_path / "known" / "tiny-gpt2" / "known_1000"
    assert last_line(done.stdout) == f"results: {out_dir}"
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["total"] >= 20 and summary["checked"] == 20
    assert summary["known"] + summary["unknown"] == 20
    run = json.loads((out_dir / "run.json").read_text())
    assert run["seed"] == 3 and run["packages"]["torch"] and "commit" in run["git"]
    config = (out_dir / "config.yaml").read_text()
    assert "name: tiny-gpt2" in config and "${" not in config  # resolved
    recall = (out_dir / "recall.jsonl").read_text().splitlines()
    assert len(recall) == 20
    assert list((tmp_path / "wandb").glob("offline-run-*/*.wandb"))


def test_known_stage_is_reproducible(tmp_path):
    outputs = []
    for attempt in ("a", "b"):
        done = run_stage(
            "known", "model=tiny-llama", "data.limit=10", f"paths.results={tmp_path / attempt}"
        )
        assert done.returncode == 0, done.stderr[-3000:]
        outputs.append(
            (tmp_path / attempt / "known/tiny-llama/known_1000/recall.jsonl").read_text()
        )
    assert outputs[0] == outputs[1]


def test_help_and_cfg_job():
    helped = run_stage("known", "--help")
    assert helped.returncode == 0 and "model: " in helped.stdout and "smollm2-135m" in helped.stdout
    shown = run_stage("known", "--cfg", "job", "model=tiny-neox", "dtype=bfloat16")
    assert shown.returncode == 0, shown.stderr
    assert "name: tiny-neox" in shown.stdout and "dtype: bfloat16" in shown.stdout


def test_env_vars_set_paths(tmp_path):
    shown = run_stage(
        "known", "--cfg", "job", "--resolve", env={"ROME_RESULTS": str(tmp_path), "ROME_DATA": "/d"}
    )
    assert shown.returncode == 0, shown.stderr
    assert f"results: {tmp_path}" in shown.stdout and "data: /d" in shown.stdout


def test_multirun_sweeps_models(tmp_path):
    done = run_stage(
        "known",
        "--multirun",
        "model=tiny-gpt2,tiny-llama",
        "data.limit=5",
        f"paths.results={tmp_path}",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for model in ("tiny-gpt2", "tiny-llama"):
        assert (tmp_path / "known" / model / "known_1000" / "summary.json").exists()
    assert list((tmp_path / "logs" / "multirun" / "known").glob("*/0"))


def test_bad_data_is_reported_not_lost(tmp_path):
    records = json.loads((ROOT / "data/samples/known_1000_sample.json").read_text())[:6]
    records[2]["subject"] = "Nobody At All"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(records))
    done = run_stage("known", "model=tiny-gpt2", f"data.path={bad}", f"paths.results={tmp_path}")
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "known/tiny-gpt2/known_1000/summary.json").read_text())
    assert summary["skipped"] == 1 and summary["checked"] == 5 and summary["total"] == 6
    assert summary["data"]["skipped_records"][0]["field"] == "subject"
    failed = run_stage(
        "known",
        "model=tiny-gpt2",
        f"data.path={bad}",
        "data.on_error=fail",
        f"paths.results={tmp_path}",
    )
    assert failed.returncode != 0 and "record 2" in failed.stderr and "'subject'" in failed.stderr


@pytest.mark.slow
def test_smollm2_knows_its_facts(tmp_path, data_root):
    """The embedded model on all 1,209 known facts (about 280 by a first-token match)."""
    done = run_stage(
        "known", f"paths.results={tmp_path}", "batch_size=32", env={"ROME_DATA": str(data_root)}
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "known/smollm2-135m/known_1000/summary.json").read_text())
    assert summary["total"] == 1209 and summary["skipped"] == 0
    assert 200 <= summary["first_token_known"] <= 360
    assert 0 < summary["known"] <= summary["first_token_known"]
    known = json.loads((tmp_path / "known/smollm2-135m/known_1000/known.json").read_text())
    assert len(known) == summary["known"]
    assert any(fact["answer"] == " French" and fact["first_token_prob"] > 0.1 for fact in known)
    assert Path(summary["data"]["path"]).name == "known_1000.json"


def test_config_differences_ignore_how_work_is_split_even_for_old_saved_configs():
    from pipeline.app.stage import config_differences

    saved = {"seed": 0, "shard": {"index": 0}, "out_dir": "./a", "editor": {"v_lr": 0.5}}
    current = {"seed": 0, "shard": {"index": 1}, "out_dir": "/abs/a", "editor": {"v_lr": 0.1}}
    assert config_differences(saved, current) == ["editor.v_lr: 0.5 -> 0.1"]
    assert config_differences(saved, {**current, "editor": {"v_lr": 0.5}}) == []


def test_an_unfinished_merge_names_the_merge_commands_own_flag():
    from pipeline.app.stage import require_complete

    with pytest.raises(SystemExit) as refused:
        require_complete({0: [0, 4], 1: []}, 4, 2, "cases", allow_partial=False)
    message = str(refused.value)
    assert "shard 0 of 2: 2 cases missing (ids 0, 4)" in message
    assert "pipeline.merge DIR --allow-partial" in message  # the flag merge's parser takes


def test_a_wrong_setting_stops_before_any_file_or_run_and_names_key_value_and_choices(tmp_path):
    bad = run_stage(
        "known",
        "model=tiny-gpt2",
        f"paths.results={tmp_path}",
        "dtype=float61",
        "data.limit=abc",
        "tracking.mode=offline",
        env={"ROME_WANDB_MODE": "offline"},
    )
    assert bad.returncode != 0
    assert (
        "dtype='float61' is not allowed (allowed: one of float32, bfloat16, float16, float64)"
        in (bad.stderr)
    )
    assert "data.limit='abc' is not allowed (allowed: an integer, at least 0, or null)" in (
        bad.stderr
    )
    # no results directory (so no config.yaml to block the fix) and no W&B run; only Hydra's log
    assert [p.name for p in tmp_path.iterdir()] == ["logs"]
    fixed = run_stage("known", "model=tiny-gpt2", f"paths.results={tmp_path}", "data.limit=3")
    assert fixed.returncode == 0, fixed.stderr[-3000:]


def test_every_shipped_config_passes_the_schema_and_editor_numbers_are_typed():
    from hydra import compose, initialize_config_dir

    from pipeline.app.schema import ConfigError, editor_settings, validate_config

    settings = editor_settings()
    assert settings["editor.v_lr"].accepts(1) and not settings["editor.v_lr"].accepts("fast")
    assert settings["editor.emmet_lambda"].accepts(0.1)  # every editor's numbers, not ROME's only
    assert not settings["editor.name"].accepts("rom")
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        for name in ("known", "trace", "stats", "evaluate", "summarize", "report"):
            validate_config(compose(name))
        for model in sorted(p.stem for p in (ROOT / "conf/model").glob("*.yaml")):
            validate_config(compose("evaluate", overrides=[f"model={model}", "editor=r-rome"]))
        for editor in sorted(p.stem for p in (ROOT / "conf/editor").glob("*.yaml")):
            validate_config(compose("evaluate", overrides=[f"editor={editor}", "eval.mode=mass"]))
        for wrong in ("shard.index=2", "trace.kinds=[hidden,mlps]", "trace.engine=quick"):
            with pytest.raises(ConfigError, match=wrong.split("=")[0]):
                validate_config(compose("trace", overrides=[wrong, "shard.count=2"]))


def test_a_resume_over_other_records_is_refused_naming_the_file_and_both_digests(tmp_path):
    records = json.loads((ROOT / "data/samples/counterfact-edit_sample.json").read_text())[:3]

    def data_root(name):
        path = tmp_path / name / "counterfact_easyedit/counterfact-edit.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(records))
        return path

    first, second = data_root("a"), data_root("b")
    args = (
        "model=tiny-gpt2",
        "editor=none",
        f"paths.results={tmp_path}",
        f"paths.cache={tmp_path}",
        f"corpus.local_dir={tmp_path}",  # (else derived from the data root)
        f"corpus.cache_dir={tmp_path}",
    )
    done = run_stage("evaluate", *args, f"paths.data={tmp_path / 'a'}", "data.limit=2")
    assert done.returncode == 0, done.stderr[-3000:]
    out_dir = tmp_path / "evaluate/tiny-gpt2/counterfact-easyedit/none"
    recorded = json.loads((out_dir / "run.json").read_text())["data"]
    summary = json.loads((out_dir / "summary.json").read_text())
    assert recorded["sha256"] == summary["data"]["sha256"] and len(recorded["sha256"]) == 64
    # another data root (paths may change between runs) with the same records: continues
    moved = run_stage("evaluate", *args, f"paths.data={tmp_path / 'b'}", "data.limit=3")
    assert moved.returncode == 0, moved.stderr[-3000:]
    # each sitting of a resumed run is kept, with its commit and its own time
    meta = json.loads((out_dir / "run.json").read_text())
    assert [set(s) for s in meta["sittings"]] == [{"started", "commit", "dirty", "seconds"}] * 2
    summary = json.loads((out_dir / "summary.json").read_text())
    assert meta["sittings"][-1]["seconds"] == summary["seconds"] > 0
    assert meta["machine"]["cpus"] >= 1 and meta["machine"]["torch_threads"] >= 1
    records[2]["target_new"] = "Klingon"  # edited in place
    second.write_text(json.dumps(records))
    refused = run_stage("evaluate", *args, f"paths.data={tmp_path / 'b'}", "data.limit=3")
    assert refused.returncode != 0
    message = " ".join(refused.stderr.split())
    assert f"{second} (sha256 {recorded['sha256']})" in message
    assert f"{second} now has sha256 " in message and "holds results of other records" in message
    assert first.exists()


def test_a_known_fact_longer_than_the_context_is_a_named_skipped_record(tmp_path):
    records = json.loads((ROOT / "data/samples/known_1000_sample.json").read_text())[:3]
    records[1]["prompt"] = "Once upon a time," * 100 + " " + records[1]["prompt"]
    data = tmp_path / "long.json"
    data.write_text(json.dumps(records))
    done = run_stage("known", "model=tiny-gpt2", f"data.path={data}", f"paths.results={tmp_path}")
    assert done.returncode == 0, done.stderr[-3000:]  # used to die: IndexError
    summary = json.loads((tmp_path / "known/tiny-gpt2/known_1000/summary.json").read_text())
    assert summary["skipped"] == 1 and summary["checked"] == 2
    assert summary["data"]["skipped_records"][0]["field"] == "prompt"


OFFLINE = {"ROME_WANDB_MODE": "offline"}


def offline_runs(results: Path) -> list[dict]:
    """Every W&B offline run under a results root, read back once finished."""
    from tests.test_tracking import stored_run

    return [stored_run(d) for d in sorted((results / "wandb").glob("offline-run-*"))]


def test_a_crashed_stage_is_a_failed_wandb_run(tmp_path):
    done = run_stage(
        "known", "model=tiny-gpt2", "data.path=/nonexistent/known.json",
        f"paths.results={tmp_path}", env=OFFLINE,
    )  # fmt: skip
    assert done.returncode != 0 and "does not exist" in done.stderr
    [run] = offline_runs(tmp_path)
    assert run["exit_code"] == 1 and run["run"]["job_type"] == "known"
    assert not [a for a in run["artifacts"] if a["type"] == "known"]  # a crash is no result


def test_reruns_resume_their_wandb_run_and_a_sweep_keeps_its_group(tmp_path):
    for _ in range(2):  # the sweep, then the same sweep again (as after a requeue)
        done = run_stage(
            "known", "--multirun", "model=tiny-gpt2,tiny-llama", "data.limit=3",
            f"paths.results={tmp_path}", env=OFFLINE,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
    runs = offline_runs(tmp_path)
    assert len(runs) == 4 and all(r["exit_code"] == 0 for r in runs)
    assert {r["run"]["group"] for r in runs} == {"known: data.limit=3 model=tiny-gpt2,tiny-llama"}
    ids = {}
    for r in runs:  # (W&B stores logged tables as artifacts too: type run_table)
        ids.setdefault(r["run"]["id"], []).extend(
            a["name"] for a in r["artifacts"] if a["type"] == "known"
        )
    # Two W&B runs, one per job, each resumed once; each logs its results directory.
    assert sorted(ids.values()) == [
        ["known-tiny-gpt2-known_1000"] * 2,
        ["known-tiny-llama-known_1000"] * 2,
    ]
    [logged] = [a for a in runs[0]["artifacts"] if a["type"] == "known"]
    assert {"known.json", "summary.json", "config.yaml"} <= set(logged["files"])


def test_stages_return_their_headline_number():
    from pipeline.app.stage import headline

    assert headline("evaluate", {"post": {"S": {"mean": 83.2}}}) == 83.2
    # A run whose paired ES change reaches 0 did not edit: it ranks below every run that did.
    moved = {"post": {"S": {"mean": 60.0}}, "change": {"ES": {"low": 2.0}}}
    unmoved = {"post": {"S": {"mean": 70.0}}, "change": {"ES": {"low": -1.0}}}
    assert headline("evaluate", moved) == 60.0
    assert headline("evaluate", unmoved) == 70.0 - 100.0 < headline("evaluate", moved)
    assert (
        headline("evaluate", {"checkpoints": [{"S": {"mean": 1.0}}, {"S": {"mean": 2.0}}]}) == 2.0
    )
    assert headline("known", {"known": 3, "checked": 12}) == 0.25
    assert headline("trace", {"peaks": {"mlp": {"last_subject_peak_effect": 0.1}}}) == 0.1
    assert headline("trace", {"peaks": {}}) is None and headline("report", {}) is None
