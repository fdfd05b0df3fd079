"""scripts/reference_edition.sh: the edition's runs as a queue that resumes where it stopped."""

import os
import subprocess
import sys

from tests.conftest import ROOT

SCRIPT = ROOT / "scripts/reference_edition.sh"


def edition(tmp_path, python: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "QUEUE": str(tmp_path / "queue"), "PY": python,
           "ROME_RESULTS": str(tmp_path / "results"), "EDITION": str(tmp_path / "edition"),
           "SNAPSHOT_PY": sys.executable}  # fmt: skip
    return subprocess.run(
        ["bash", str(SCRIPT), *(args or ["2"])],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
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


def test_saved_progress_is_restored_into_a_fresh_checkout_and_the_runs_go_on_from_it(tmp_path):
    """Each session starts from a fresh clone: what `save` commits is what the next start
    resumes from, complete lines only (a run may be writing its cases when they are saved)."""
    assert edition(tmp_path, "/bin/true").returncode == 0  # every run done, the lists written
    jobs = (tmp_path / "queue/jobs").read_text().splitlines()
    done = (tmp_path / "queue/done").read_text().splitlines()
    (tmp_path / "queue/done").write_text("\n".join(done[:3]) + "\n")  # three runs finished
    run = tmp_path / "results/evaluate/smollm2-135m/counterfact-first1000/memit"
    run.mkdir(parents=True)
    (run / "cases-0of1.jsonl").write_text('{"id": 0}\n{"id": 1}\n{"id": 2, "po')  # torn
    (run / "run.json").write_text("{}")
    (run / "mass-progress.pt").write_bytes(b"weights")  # not text: never saved
    other = tmp_path / "results/evaluate/smollm2-135m/counterfact-easyedit/memit"
    other.mkdir(parents=True)
    (other / "summary.json").write_text("{}")  # not the edition's data: not saved
    saved = edition(tmp_path, "/bin/true", "save")
    assert saved.returncode == 0, saved.stderr
    copy = tmp_path / "edition/evaluate/smollm2-135m/counterfact-first1000/memit"
    assert (copy / "cases-0of1.jsonl").read_text() == '{"id": 0}\n{"id": 1}\n'
    assert sorted(p.name for p in copy.iterdir()) == ["cases-0of1.jsonl", "run.json"]
    assert not (tmp_path / "edition/evaluate/smollm2-135m/counterfact-easyedit").exists()

    for gone in ("results", "queue"):  # a fresh clone: the saved copy only
        subprocess.run(["rm", "-r", str(tmp_path / gone)], check=True)
    again = edition(tmp_path, "/bin/true")
    assert again.returncode == 0, again.stderr
    assert f"{len(jobs) - 3} of {len(jobs)} runs to go" in again.stdout
    assert (run / "cases-0of1.jsonl").read_text() == '{"id": 0}\n{"id": 1}\n'
    (run / "cases-0of1.jsonl").write_text("later work\n")
    edition(tmp_path, "/bin/true")  # a restart in the same checkout keeps its own files
    assert (run / "cases-0of1.jsonl").read_text() == "later work\n"
