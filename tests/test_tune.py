"""The tuning studies (conf/tune/*.yaml): each composes for its editor with one shared budget, and
a study runs, returns S (penalised where nothing was edited) and continues when rerun."""

import json

import pytest
import yaml
from hydra import compose, initialize_config_dir

from pipeline.app.schema import validate_config
from pipeline.app.stage import headline
from tests.conftest import ROOT
from tests.test_stages import run_stage

pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason="the tune extra")

STUDIES = sorted(p.stem for p in (ROOT / "conf/tune").glob("*.yaml") if p.stem != "base")


def config(*overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("evaluate", overrides=list(overrides), return_hydra_config=True)


@pytest.mark.parametrize("study", STUDIES)
def test_every_study_tunes_its_editor_on_the_tuning_split_with_one_budget(study):
    cfg = config(f"tune={study}")
    assert cfg.editor.name == study and cfg.data.name == "counterfact-tune"
    sweeper = cfg.hydra.sweeper
    assert sweeper.n_trials == 12 and cfg.data.limit == 25 and sweeper.sampler.seed == 0
    assert sweeper.direction == "maximize" and sweeper.params
    for key in sweeper.params:
        assert key.startswith("editor.") and key.removeprefix("editor.") in cfg.editor, key
    validate_config(cfg)  # the searched keys exist; values are checked per trial


def test_a_study_runs_and_continues_from_its_trials_when_rerun(tmp_path):
    args = (
        "--multirun",
        "tune=kn",
        "model=tiny-gpt2",
        "data=counterfact-easyedit",  # the bundled sample: no data root needed
        f"paths.data={tmp_path / 'empty'}",
        "data.limit=2",
        "hydra.sweeper.n_trials=2",
        f"paths.results={tmp_path / 'results'}",
    )
    first = run_stage("evaluate", *args)
    assert first.returncode == 0, first.stderr[-3000:]
    results = tmp_path / "results/sweeps/tune-kn/logs/evaluate/optimization_results.yaml"
    best = yaml.safe_load(results.read_text())
    # The study's best value is the best trial's headline, read back from its summary.
    summaries = sorted((tmp_path / "results/sweeps/tune-kn/evaluate").rglob("summary.json"))
    assert len(summaries) == 2
    values = [headline("evaluate", json.loads(p.read_text())) for p in summaries]
    assert best["best_value"] == max(values)
    again = run_stage("evaluate", *args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (again.stdout + again.stderr).count("2 cases in this shard, 2 already evaluated") == 2
    assert yaml.safe_load(results.read_text()) == best
