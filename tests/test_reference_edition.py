"""scripts/reference_edition.sh: the edition's runs as a queue that resumes where it stopped."""

import os
import subprocess

from tests.conftest import ROOT

SCRIPT = ROOT / "scripts/reference_edition.sh"


def edition(tmp_path, python: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "QUEUE": str(tmp_path / "queue"), "PY": python,
           "ROME_RESULTS": str(tmp_path / "results")}  # fmt: skip
    return subprocess.run(
        ["bash", str(SCRIPT), "2"], env=env, capture_output=True, text=True, timeout=120
    )


def test_every_run_is_taken_once_and_a_rerun_goes_on_from_what_is_done(tmp_path):
    done = edition(tmp_path, "/bin/true")  # every run "succeeds" at once
    assert done.returncode == 0, done.stderr
    jobs = (tmp_path / "queue/jobs").read_text().splitlines()
    assert done.stdout.startswith(f"{len(jobs)} of {len(jobs)} runs to go")
    finished = [
        line.split(" ", 1)[1] for line in (tmp_path / "queue/done").read_text().splitlines()
    ]
    assert sorted(finished) == sorted(jobs)  # each once, by two workers
    names = [job.split()[0] for job in jobs]
    table = {"none", "ft", "ft-l", "kn", "rome", "r-rome", "memit", "emmet", "alphaedit"}
    assert {f"first1000-{e}" for e in table} <= set(names) and len(set(names)) == len(names)
    again = edition(tmp_path, "/bin/true")
    assert again.stdout.startswith(f"0 of {len(jobs)} runs to go")


def test_a_failed_run_is_listed_and_taken_again_at_the_next_start(tmp_path):
    done = edition(tmp_path, "/bin/false")
    assert done.returncode == 0
    failed = (tmp_path / "queue/failed").read_text().splitlines()
    jobs = (tmp_path / "queue/jobs").read_text().splitlines()
    assert len(failed) == len(jobs) and all(" rc=" in line for line in failed)
    assert edition(tmp_path, "/bin/true").stdout.startswith(f"{len(jobs)} of {len(jobs)}")
