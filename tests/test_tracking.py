import time

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


def test_from_config_respects_env(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert tracking.from_config({"mode": "offline"}).mode == "disabled"
