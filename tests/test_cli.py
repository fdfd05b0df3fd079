"""The command line: `--help` and `--cfg` answered from the config alone, hints for typos."""

import subprocess
import sys

import pytest

from pipeline.app.cli import stage_of, suggestions
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


def test_a_misspelt_key_names_the_closest_one():
    done = python_m("pipeline.known", "modle=gpt2")
    assert done.returncode != 0
    assert "Key 'modle' is not in struct" in done.stderr  # Hydra's own message stays
    assert "'modle' is not a setting of pipeline.known: did you mean 'model'?" in done.stderr
    hints = suggestions("evaluate", ["data.limt=5", "seed=1", "+extra=1", "--multirun", "zzzz=1"])
    assert len(hints) == 2
    assert "did you mean 'data.limit'?" in hints[0]
    assert "'zzzz'" in hints[1] and "no setting has a similar name" in hints[1]


def test_stage_of_reads_the_command_line():
    assert stage_of(["python", "-m", "pipeline.trace", "--help"]) == "trace"
    assert stage_of(["python", "-X", "importtime", "-m", "pipeline.report"]) == "report"
    assert stage_of(["python", "-m", "pipeline.merge", "DIR"]) is None  # not a Hydra stage
    assert stage_of(["python", "-m", "pytest", "-q"]) is None
    assert stage_of(["python", "script.py"]) is None
