"""known_1000 and CounterFact's known-fact candidates in one file (pipeline.data.known_union):
the rule on hand-made records, and the real file where the data root has it."""

import json

import pytest

from pipeline.data import counterfact_known, known_union
from pipeline.data.records import load_known
from pipeline.data.sources import derived_provenance, resolve_data_file

ENTRY = {
    "name": known_union.NAME,
    "file": "known_1000.json",
    "derived": known_union.NAME,
    "sample": None,
}


def fact(known_id, subject, template, relation, case_id=None):
    record = {
        "known_id": known_id,
        "subject": subject,
        "template": template,
        "prompt": template.format(subject),
        "attribute": "x",
        "relation_id": relation,
    }
    return record if case_id is None else {**record, "case_id": case_id}


def test_candidates_stating_a_known_1000_fact_are_left_out_and_the_rest_renumbered():
    known = [fact(0, "Louvre", "{} is in", "P131"), fact(1, "Paris", "{} is the capital of", None)]
    candidates = [
        fact(3, "Louvre", "{}, located in", "P131", case_id=3),  # same subject and relation
        fact(4, "Paris", "{} is the capital of", None, case_id=4),  # same subject and template
        fact(5, "Louvre", "{} is owned by", "P127", case_id=5),  # another relation: kept
        fact(6, "Lyon", "{} is in", "P131", case_id=6),  # another subject: kept
    ]
    records, counts = known_union.union(known, candidates)
    assert [r["known_id"] for r in records] == [0, 1, 100_005, 100_006]
    assert records[2]["case_id"] == 5 and records[2]["subject"] == "Louvre"
    assert counts == {"known_1000": 2, "candidates": 4, "same_fact_as_known_1000": 2, "kept": 4}


def test_the_real_union_starts_with_known_1000_and_has_unique_ids_and_facts(data_root, tmp_path):
    if known_union.missing_sources(data_root):
        pytest.skip(f"the data root lacks {known_union.missing_sources(data_root)}")
    path, origin = resolve_data_file(ENTRY, data_root, tmp_path)
    assert origin == "derived" and derived_provenance(path)["derived"]
    records = json.loads(path.read_text())
    known = json.loads((data_root / counterfact_known.KNOWN_1000).read_text())
    assert records[: len(known)] == known
    ids = [r["known_id"] for r in records]
    assert len(set(ids)) == len(ids)
    rest = records[len(known) :]
    assert all(r["known_id"] == known_union.CASE_OFFSET + r["case_id"] for r in rest)
    stated = {(r["subject"], r["relation_id"]) for r in known}
    assert not any((r["subject"], r["relation_id"]) in stated for r in rest if r["relation_id"])
    assert len(load_known(path, on_error="fail").records) == len(records) > 20_000
