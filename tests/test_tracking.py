import functools
import json
import time
from types import SimpleNamespace

import pytest

from pipeline.app import tracking
from pipeline.app.tracking import Tracker, read_offline_run


def test_offline_run_files_hold_logged_metrics(tmp_path):
    tracker = Tracker(mode="offline", directory=tmp_path, name="t", config={"seed": 3})
    assert tracker.active
    tracker.log({"known": 5, "rate": 0.25})
    tracker.log({"known": 7, "rate": 0.5})
    tracker.summary({"total": 12, "ci": {"low": 0.1, "high": 0.9}})
    run_dir = tracker.run_dir
    tracker.finish()
    for _ in range(100):  # the W&B service may still be flushing the file after finish()
        stored = read_offline_run(run_dir)
        if stored["history"] and "total" in stored["summary"]:
            break
        time.sleep(0.1)
    assert [row["known"] for row in stored["history"] if "known" in row] == [5, 7]
    assert stored["summary"]["total"] == 12
    assert stored["summary"]["ci/high"] == 0.9


def test_wandb_failure_never_kills_a_run(tmp_path, monkeypatch, caplog):
    import wandb

    def broken(*args, **kwargs):
        raise RuntimeError("no network")

    monkeypatch.setattr(wandb, "init", broken)
    tracker = Tracker(mode="online", directory=tmp_path)
    assert not tracker.active and "no network" in caplog.text
    tracker.log({"x": 1})
    tracker.table("t", ["a"], [[1]])
    tracker.finish()


def test_disabled_and_bad_mode(tmp_path):
    assert not Tracker(mode="disabled").active
    with pytest.raises(ValueError, match="tracking.mode"):
        Tracker(mode="sometimes")


def test_an_explicit_mode_beats_an_exported_wandb_mode(monkeypatch):
    """WANDB_MODE=online exported used to make a run meant to stay local upload."""
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert tracking.chosen_mode({"mode": "offline"}) == ("offline", "tracking.mode")
    assert tracking.from_config({"mode": "disabled"}).mode == "disabled"
    assert tracking.chosen_mode({"mode": None}) == ("disabled", "WANDB_MODE")  # no choice made
    monkeypatch.setenv("WANDB_MODE", "dryrun")  # W&B's old name for offline
    assert tracking.chosen_mode({"mode": None}) == ("offline", "WANDB_MODE")
    monkeypatch.delenv("WANDB_MODE")
    assert tracking.chosen_mode({"mode": None}) == ("offline", "default")


@pytest.mark.parametrize(
    "override, exported, used, source",
    [
        ("tracking.mode=disabled", "online", "disabled", "tracking.mode"),
        (None, "disabled", "disabled", "WANDB_MODE"),  # the shipped default: no choice made
    ],
)
def test_config_yaml_and_run_json_record_the_mode_used(
    tmp_path, monkeypatch, override, exported, used, source
):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from pipeline.app.stage import Run
    from tests.conftest import ROOT

    monkeypatch.delenv("ROME_WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_MODE", exported)
    overrides = [f"paths.results={tmp_path}", "model=tiny-gpt2", *([override] if override else [])]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("known", overrides=overrides)
    run = Run(cfg, "known")
    try:
        assert run.tracker.mode == used
        assert OmegaConf.load(run.path("config.yaml")).tracking.mode == used
        assert json.loads(run.path("run.json").read_text())["tracking"] == {
            "mode": used,
            "from": source,
        }
    finally:
        run.close()


def stored_run(run_dir, until=lambda stored: stored["exit_code"] is not None):
    """The offline run read back once the W&B service has written what `until` waits for."""
    for _ in range(100):  # the service may still be flushing the file after finish()
        stored = read_offline_run(run_dir)
        if until(stored):
            return stored
        time.sleep(0.1)
    return stored


def test_a_failed_run_is_stored_as_failed(tmp_path):
    tracker = Tracker(mode="offline", directory=tmp_path, name="crash")
    run_dir = tracker.run_dir
    tracker.finish(exit_code=1)
    assert stored_run(run_dir)["exit_code"] == 1
    tracker = Tracker(mode="offline", directory=tmp_path, name="fine")
    run_dir = tracker.run_dir
    tracker.finish()
    assert stored_run(run_dir)["exit_code"] == 0


def test_run_ids_are_stable_per_results_directory_and_part(tmp_path):
    a = tracking.run_id(tmp_path / "evaluate/m/d/rome", "shard 0 of 4")
    assert a == tracking.run_id(tmp_path / "evaluate/m/d/rome", "shard 0 of 4")  # a requeue
    assert a != tracking.run_id(tmp_path / "evaluate/m/d/rome", "shard 1 of 4")
    assert a != tracking.run_id(tmp_path / "evaluate/m/d/r-rome", "shard 0 of 4")
    assert a.isalnum() and len(a) == 16
    first = Tracker(mode="offline", directory=tmp_path, run_id=a)
    first_dir = first.run_dir
    first.finish()
    again = Tracker(mode="offline", directory=tmp_path, run_id=a)
    again_dir = again.run_dir
    again.finish()
    assert first_dir != again_dir  # two offline files, one W&B run once synced
    assert stored_run(first_dir)["run"]["id"] == stored_run(again_dir)["run"]["id"] == a


def test_a_sweep_job_never_adopts_the_run_of_a_standalone_run_in_the_same_directory(tmp_path):
    """A standalone run and a later sweep job writing one results directory shared a run id:
    the sweep resumed the earlier run, moved it into its group and overwrote its summary."""
    out = tmp_path / "evaluate/m/d/rome"
    standalone = tracking.run_id(out, "shard 0 of 1")
    in_sweep = tracking.run_id(out, "shard 0 of 1", "evaluate: editor.layer=0,6")
    assert standalone != in_sweep
    assert in_sweep == tracking.run_id(out, "shard 0 of 1", "evaluate: editor.layer=0,6")
    assert in_sweep != tracking.run_id(out, "shard 0 of 1", "evaluate: editor.layer=0,7")
    assert standalone == tracking.run_id(out, "shard 0 of 1", None)  # a rerun still resumes


def test_artifacts_are_named_by_results_path_stage_and_experiment_not_the_checkout(tmp_path):
    """The report's artifact was named after the checkout folder (`house-reports-<experiment>`
    from the last path parts of a directory outside the results)."""
    from omegaconf import OmegaConf

    from pipeline.app.stage import Run

    checkout = tmp_path / "some-checkout"
    report = checkout / "reports/paper_gpt2xl"
    cfg = OmegaConf.create(
        {"paths": {"results": str(checkout / "results")}, "experiment_name": "paper_gpt2xl"}
    )
    run = SimpleNamespace(cfg=cfg, out_dir=report, stage="report")
    name = functools.partial(Run.artifact_name, run)
    assert name(report) == "report-paper_gpt2xl"
    assert name(checkout / "results/trace/m/known_1000") == "trace-m-known_1000"
    # the report's snapshot of an input: the upstream run's own artifact name
    assert name(report / "inputs/trace/m/known_1000") == "trace-m-known_1000"


def test_sweep_group_comes_from_the_sweeps_settings_not_its_start_time():
    group = tracking.sweep_group(
        "evaluate", ["sweep=layers", "editor.layer=0,6,14", "data.limit=5"]
    )
    assert group == "evaluate: data.limit=5 editor.layer=0,6,14 sweep=layers"
    # Resumed elsewhere (another launcher, results root, device or W&B mode): the same sweep.
    moved = ["data.limit=5", "hydra/launcher=slurm", "editor.layer=0,6,14", "sweep=layers",
             "paths.results=/shared", "device=cuda", "tracking.mode=online"]  # fmt: skip
    assert tracking.sweep_group("evaluate", moved) == group
    assert tracking.sweep_group("evaluate", ["editor.layer=0,6"]) != group
    long = tracking.sweep_group("trace", [f"key{i}=value{i}" for i in range(30)])
    assert len(long) < 128 and long.startswith("trace: ")


def test_figures_are_logged_in_one_step(tmp_path):
    from PIL import Image

    for name in ("a", "b", "c"):
        Image.new("RGB", (8, 8), "red").save(tmp_path / f"{name}.png")
    tracker = Tracker(mode="offline", directory=tmp_path)
    tracker.images({f"figures/{n}": tmp_path / f"{n}.png" for n in ("a", "b", "c")})
    run_dir = tracker.run_dir
    tracker.finish()
    history = stored_run(run_dir)["history"]
    rows = [row for row in history if any(k.startswith("figures/") for k in row)]
    assert len(rows) == 1  # one step holds every figure
    assert all(rows[0][f"figures/{n}/_type"] == "image-file" for n in ("a", "b", "c"))


def test_directories_are_artifacts_and_inputs_carry_their_digest(tmp_path):
    offline_pair(tmp_path)


def offline_pair(tmp_path):
    """An upstream run logging a results directory and a downstream run reading it, offline;
    both as stored."""
    results = tmp_path / "known/m/d"
    (results / "figures").mkdir(parents=True)
    (results / "known.json").write_text("[1, 2]")
    (results / "summary.json").write_text("{}")
    (results / "figures/f.png").write_bytes(b"png")
    (results / "figures/f.pdf").write_bytes(b"pdf")  # PDFs and subdirectories stay out
    (results / "prompts").mkdir()
    (results / "prompts/1.json").write_text("{}")
    name = tracking.artifact_name("known/m/d")
    assert name == "known-m-d" and tracking.artifact_name("a/editor.layer=3") == "a-editor.layer-3"
    upstream = Tracker(mode="offline", directory=tmp_path)
    upstream.log_directory(results, "known", name)
    upstream_dir = upstream.run_dir
    upstream.finish()
    downstream = Tracker(mode="offline", directory=tmp_path)
    downstream.use_directory(results, "known", name)
    downstream_dir = downstream.run_dir
    downstream.finish()
    logged = stored_run(upstream_dir)["artifacts"]
    assert [(a["name"], a["type"]) for a in logged] == [("known-m-d", "known")]
    assert logged[0]["files"] == ["figures/f.png", "known.json", "summary.json"]
    used = stored_run(downstream_dir, lambda s: "inputs" in s["config"])["config"]["inputs"]
    assert used["known-m-d"]["digest"] == logged[0]["digest"]  # the exact input, traceable
    return stored_run(upstream_dir), stored_run(downstream_dir, lambda s: "inputs" in s["config"])


class Synced:
    """What `wandb sync` puts on the server, as the public API shows it: the runs read back
    from their offline files, each upstream artifact as version v0 (no network here)."""

    def __init__(self, *stored):
        self.used: dict[str, list] = {}
        self.stored = stored

    def runs(self, project):
        return [SimpleRun(self, s) for s in self.stored]

    def artifacts(self, kind, name):
        short = name.rsplit("/", 1)[-1]
        return [
            SimpleNamespace(name=f"{a['name']}:v0", digest=a["digest"], version="v0")
            for s in self.stored
            for a in s["artifacts"]
            if a["name"] == short and a["type"] == kind
        ]


class SimpleRun:
    def __init__(self, api, stored):
        self.api, self.id, self.config = api, stored["run"]["id"], stored["config"]

    def used_artifacts(self):
        return self.api.used.get(self.id, [])

    def use_artifact(self, artifact):
        self.api.used.setdefault(self.id, []).append(artifact)


def test_offline_lineage_becomes_w_and_bs_own_after_sync(tmp_path):
    """Offline runs kept their inputs only as a config key: after a sync W&B drew no lineage.
    `link_inputs` makes each synced run use the upstream version of the recorded digest."""
    upstream, downstream = offline_pair(tmp_path)
    api = Synced(upstream, downstream)
    made = tracking.link_inputs(api, "me/rome-pipeline")
    assert made == [f"{downstream['run']['id']} uses known-m-d:v0"]
    (used,) = api.used[downstream["run"]["id"]]
    assert used.digest == upstream["artifacts"][0]["digest"]
    assert tracking.link_inputs(api, "me/rome-pipeline") == []  # once only
    unsynced = Synced(downstream)  # the upstream run not synced yet: said, not guessed
    assert "no synced version of known-m-d" in tracking.link_inputs(unsynced, "me/p")[0]


def test_running_rates():
    rates = tracking.RunningRates([{"ES": 1.0, "PS": 0.5, "NS": float("nan")}])
    assert rates.values() == {"progress/cases_done": 1, "progress/ES": 100.0, "progress/PS": 50.0}
    now = rates.add([{"ES": 0.0, "PS": 1.0, "NS": 1.0}])
    assert now == {
        "progress/cases_done": 2,
        "progress/ES": 50.0,
        "progress/PS": 75.0,
        "progress/NS": 100.0,
    }


def test_system_metrics_follow_the_gpu(monkeypatch):
    seen = {}
    monkeypatch.setattr(tracking, "Tracker", lambda **kwargs: seen.update(kwargs))
    monkeypatch.setattr(tracking, "gpu_visible", lambda: True)
    tracking.from_config({"mode": "offline"})
    assert seen["system_metrics"] is True
    tracking.from_config({"mode": "offline", "system_metrics": False})
    assert seen["system_metrics"] is False
