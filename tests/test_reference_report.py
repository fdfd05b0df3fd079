"""The committed reference report (`reports/default_smollm2/`) against the code that writes it.

Rebuilt from its committed inputs alone, as `make figures` does on a fresh clone, its tables and
index are the committed files: a change to the report's code that changes what it writes fails
here until the report is regenerated and committed with it.
"""

from __future__ import annotations

import re
import shutil
import subprocess

from tests.conftest import ROOT
from tests.test_stages import stage_process

REPORT = ROOT / "reports/default_smollm2"
WRITTEN = ("table.md", "table.tex", "table.csv", "headline.md", "index.md", "layer_sweep.json")


def without_header(index: str) -> str:
    """index.md less its first lines, which name the report run itself (time, commit)."""
    return index.split("\n", 3)[3]


def test_the_committed_report_rebuilds_identically_from_its_committed_inputs(tmp_path):
    committed = {name: (REPORT / name).read_text() for name in WRITTEN if (REPORT / name).exists()}
    assert {"table.md", "index.md"} <= set(committed), "the reference report is not committed"
    copy = tmp_path / "default_smollm2"
    shutil.copytree(REPORT, copy)
    # From an empty directory, as a fresh clone: `./results` holds nothing, so every input is
    # read from the report's own copy (and what is not run yet is named as the repository does).
    process = stage_process("report", f"out_dir={copy}", capture_output=True)
    process["cwd"] = tmp_path
    process["env"]["PYTHONPATH"] = str(ROOT)
    done = subprocess.run(**process, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    for name, text in committed.items():
        again = (copy / name).read_text()
        if name == "index.md":
            text, again = without_header(text), without_header(again)
        assert again == text, f"{name} differs: regenerate the report (make figures) and commit it"
    index = committed["index.md"]
    for link in re.findall(r"\]\(([^)]+)\)", index):
        assert (REPORT / link).exists(), f"index.md links {link}, which is not committed"


def test_the_readmes_table_is_the_reports():
    """The README's Table 4 is the report's `headline.md` verbatim: it cannot drift from the
    runs (regenerate the report, then paste headline.md into the README)."""
    table = (REPORT / "headline.md").read_text()
    assert table in (ROOT / "README.md").read_text(), "README.md's table is not headline.md"
