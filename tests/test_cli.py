"""The command line: `--help` and `--cfg` answered from the config alone, hints for typos."""

import subprocess
import sys

import pytest

from pipeline.app.cli import override_problems, stage_of, suggestions
from tests.conftest import ROOT


def python_m(*args: str) -> subprocess.CompletedProcess:
    """`python -X importtime -m ...`: stderr lists every module the command imported."""
    return subprocess.run(
        [sys.executable, "-X", "importtime", "-m", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def imported(stderr: str) -> set[str]:
    return {line.rsplit("|", 1)[-1].strip() for line in stderr.splitlines() if "|" in line}


@pytest.mark.parametrize("stage", ["known", "trace", "stats", "evaluate", "summarize", "report"])
def test_help_is_the_stages_own_and_imports_no_torch(stage):
    done = python_m(f"pipeline.{stage}", "--help")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith(f"python -m pipeline.{stage} [overrides]")
    assert "Main options:" in done.stdout and "Examples:" in done.stdout
    assert "model: " in done.stdout or stage == "summarize"  # the config groups follow
    assert not {"torch", "transformers", "matplotlib"} & imported(done.stderr)


def test_cfg_job_imports_no_torch_and_shows_the_overrides():
    done = python_m("pipeline.trace", "--cfg", "job", "model=tiny-neox", "trace.buckets=paper")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "name: tiny-neox" in done.stdout and "buckets: paper" in done.stdout
    assert "torch" not in imported(done.stderr)


def test_a_misspelt_key_names_the_closest_one_before_the_stage_imports_torch():
    """A typo used to take 6-8 s: Hydra rejected it only after the stage imported torch."""
    done = python_m("pipeline.known", "modle=gpt2")
    assert done.returncode != 0
    assert "'modle' is not a setting of pipeline.known: did you mean 'model'?" in done.stderr
    assert "torch" not in imported(done.stderr)
    hints = suggestions("evaluate", ["data.limt=5", "seed=1", "+extra=1", "--multirun", "zzzz=1"])
    assert len(hints) == 2
    assert "did you mean 'data.limit'?" in hints[0]
    assert "'zzzz'" in hints[1] and "no setting has a similar name" in hints[1]


def test_a_misspelt_group_option_names_the_closest_one_before_torch():
    done = python_m("pipeline.evaluate", "editor=memmit", "model=tiny-gpt2")
    assert done.returncode == 1
    assert "'memmit' is not an option of editor: did you mean 'memit'?" in done.stderr
    assert "torch" not in imported(done.stderr)


def test_valid_overrides_and_what_the_check_cannot_judge_go_on_to_hydra():
    assert override_problems("evaluate", ["editor=ft", "editor.lr=1"]) == []  # ft's own key
    sweep = ["--multirun", "sweep=layers", "editor=rome,memit", "editor.layer=0,6", "+x=1"]
    assert override_problems("evaluate", sweep) == []
    assert override_problems("trace", ["trace.facts=all", "experiment=trace-gpt2-xl"]) == []
    assert (
        "did you mean 'editor.layer'?"
        in override_problems("evaluate", ["editor=memit", "editor.layerz=[0,1]"])[0]
    )
    wrong = override_problems("evaluate", ["editor=rome,memmit"])
    assert len(wrong) == 1 and "'memmit'" in wrong[0]


def test_evaluate_help_offers_only_data_it_reads_and_names_the_tune_extra():
    done = python_m("pipeline.evaluate", "--help")
    (data,) = [line for line in done.stdout.splitlines() if line.startswith("data: ")]
    assert "counterfact" in data and "zsre" in data and "known" not in data
    assert "hydra/sweeper=optuna" in done.stdout and "`tune` extra" in done.stdout
    trace = python_m("pipeline.trace", "--help").stdout
    (data,) = [line for line in trace.splitlines() if line.startswith("data: ")]
    # Known facts only: ROME's known_1000, those drawn from CounterFact and both, no edit cases.
    assert data.removeprefix("data: ").split(", ") == ["counterfact-known", "known", "known-union"]


def test_stage_of_reads_the_command_line():
    assert stage_of(["python", "-m", "pipeline.trace", "--help"]) == "trace"
    assert stage_of(["python", "-X", "importtime", "-m", "pipeline.report"]) == "report"
    assert stage_of(["python", "-m", "pipeline.merge", "DIR"]) is None  # not a Hydra stage
    assert stage_of(["python", "-m", "pytest", "-q"]) is None
    assert stage_of(["python", "script.py"]) is None
