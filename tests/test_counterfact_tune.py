"""The tuning split (pipeline.data.counterfact_tune): no case and no subject of the scored cases,
on the real data root where present and on a hand-made root."""

import json

import pytest

from pipeline.data import counterfact_tune as ct
from pipeline.data.derived import provenance
from pipeline.data.records import load_counterfact
from pipeline.data.sources import resolve_data_file

ENTRY = {"name": ct.NAME, "file": ct.VAL, "derived": ct.NAME, "sample": None}


def easyedit(case_id, subject):
    return {
        "case_id": case_id,
        "prompt": f"{subject} was born in",
        "target_new": "Rome",
        "subject": subject,
        "ground_truth": "Paris",
        "rephrase_prompt": f"Where was {subject} born? {subject} was born in",
        "locality_prompt": "Victor Hugo was born in",
        "locality_ground_truth": "Besançon",
    }


def test_cases_sharing_an_id_or_a_subject_with_the_scored_ones_are_left_out(tmp_path):
    root = tmp_path / "root"
    for name in ct.SOURCES:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
    (root / ct.FIRST1000_TRIPLES).write_text(
        json.dumps({"subject": "Ada Lovelace", "relation": "P19", "object": "London"}) + "\n"
    )
    mcf = {"case_id": 5000, "requested_rewrite": {"subject": "Alan Turing"}}
    (root / ct.MCF).write_text(json.dumps([mcf]))
    val = [
        easyedit(17, "Kept Early"),  # case_id among the first 1,000's range
        easyedit(2000, "Ada Lovelace"),  # a subject of the first 1,000
        easyedit(5000, "Someone Else"),  # a case_id of the 1,386
        easyedit(3000, "Alan Turing"),  # a subject of the 1,386
        easyedit(4000, "Grace Hopper"),
    ]
    (root / ct.VAL).write_text(json.dumps(val))
    path, origin = resolve_data_file(ENTRY, root, tmp_path / "cache")
    assert origin == "derived"
    assert [r["case_id"] for r in json.loads(path.read_text())] == [4000]
    assert provenance(path)["derived"] is True


def test_the_real_split_is_disjoint_from_the_scored_cases(data_root, tmp_path):
    if ct.missing_sources(data_root):
        pytest.skip(f"the data root lacks {ct.missing_sources(data_root)}")
    path, _ = resolve_data_file(ENTRY, data_root, tmp_path)
    cases = load_counterfact(path).records
    ids, subjects = ct.scored_cases(data_root)
    assert len(cases) == 1697  # of the val split's 1,919 (SOURCES.md 2)
    assert not {c.id for c in cases} & ids
    assert not {c.subject for c in cases} & subjects
