"""The union of the full-schema CounterFact files (pipeline.data.counterfact_union)."""

import json

import pytest

from pipeline.data import counterfact_join as cj
from pipeline.data import counterfact_union as cu
from pipeline.data.records import load_counterfact
from pipeline.data.sources import resolve_data_file

ENTRY = {"name": cu.NAME, "file": cj.PARTS_DIR, "derived": cu.NAME, "sample": None}


def test_the_first_1000_then_the_other_files_new_cases(data_root, tmp_path):
    if cu.missing_sources(data_root):
        pytest.skip(f"the data root lacks {cu.missing_sources(data_root)}")
    path, origin = resolve_data_file(ENTRY, data_root, tmp_path)
    assert origin == "derived"
    cases = json.loads(path.read_text())
    first = cj.join(data_root)
    more = json.loads((data_root / cu.MCF).read_text())
    assert cases[:1000] == first
    assert len(cases) == len({c["case_id"] for c in cases}) == 2328
    # The cases both files hold are the same records: taking the first copy loses nothing.
    shared = {c["case_id"]: c for c in first}
    both = [c for c in more if c["case_id"] in shared]
    assert len(both) == 58
    for case in both:
        mine = shared[case["case_id"]]
        for key in ("paraphrase_prompts", "neighborhood_prompts", "generation_prompts"):
            assert mine[key] == case[key], (case["case_id"], key)
    assert [c["case_id"] for c in cases[1000:]] == [
        c["case_id"] for c in more if c["case_id"] not in shared
    ]
    assert len(load_counterfact(path).records) == 2328  # every record loads
