"""Known-fact candidates from CounterFact (pipeline.data.counterfact_known): the rules on
hand-made records, the real file where the data root has it, and the `known` stage on them."""

import json

import pytest

from pipeline.data import counterfact_join
from pipeline.data import counterfact_known as ck
from pipeline.data.records import load_known
from pipeline.data.sources import derived_provenance, resolve_data_file
from tests.test_stages import run_stage

ENTRY = {"name": ck.NAME, "file": "counterfact_easyedit", "derived": ck.NAME, "sample": None}


def case(case_id, subject, prompt, truth="Paris"):
    return {"case_id": case_id, "subject": subject, "prompt": prompt, "ground_truth": truth}


def evaluated(case_id, subject, template, relation):
    rewrite = {"subject": subject, "prompt": template, "relation_id": relation}
    return {"case_id": case_id, "requested_rewrite": rewrite}


def test_evaluated_cases_and_their_facts_stay_out_and_one_case_per_fact_stays():
    cases = [
        case(0, "Eiffel Tower", "Eiffel Tower is in"),  # evaluated itself
        case(7, "Eiffel Tower", "Eiffel Tower is in", "Lyon"),  # same fact as case 0 (template)
        case(8, "Eiffel Tower", "Eiffel Tower, located in"),  # same fact by relation P131
        case(5, "Louvre", "Louvre is in"),
        case(3, "Louvre", "Louvre is in", "Nice"),  # the lower case_id wins
        case(4, "Louvre", "The Louvre's owner is Louvre's"),  # another relation: kept
    ]
    by_template = {"{} is in": "P131", "{}, located in": "P131"}
    records, counts = ck.candidates(
        cases, [evaluated(0, "Eiffel Tower", "{} is in", "P131")], {4: "P127"}, by_template
    )
    assert [r["known_id"] for r in records] == [3, 4]
    assert records[0] == {
        "known_id": 3,
        "case_id": 3,
        "subject": "Louvre",
        "attribute": "Nice",
        "template": "{} is in",
        "prompt": "Louvre is in",
        "relation_id": "P131",
    }
    assert records[1]["template"] == "The Louvre's owner is {}'s"  # the last occurrence
    assert records[1]["relation_id"] == "P127"  # the case's own record wins
    assert counts == {
        "cases": 6,
        "evaluated": 1,
        "same_fact_as_evaluated": 2,
        "duplicate": 1,
        "kept": 2,
        "no_relation_id": 0,
    }


def test_a_template_of_several_relations_names_none():
    pairs = [("{} is in", "P17"), ("{} is in", "P131"), ("{} speaks", "P1412")]
    assert ck.template_relations(pairs) == {"{} speaks": "P1412"}
    with pytest.raises(ValueError, match="not in the prompt"):
        ck.template_of("Paris is", "Lyon")


def test_the_real_candidates_leave_out_the_first_1000_records(data_root, tmp_path):
    if ck.missing_sources(data_root):
        pytest.skip(f"the data root lacks {ck.missing_sources(data_root)}")
    path, origin = resolve_data_file(ENTRY, data_root, tmp_path)
    assert origin == "derived" and derived_provenance(path)["derived"]
    records = json.loads(path.read_text())
    first1000 = {r["case_id"] for r in counterfact_join.join(data_root)}
    ids = [r["case_id"] for r in records]
    assert ids == sorted(ids) and not first1000 & set(ids)
    keys = [(r["subject"], r["relation_id"] or r["template"]) for r in records]
    assert len(set(keys)) == len(keys)
    assert all(r["prompt"] == r["template"].format(r["subject"]) for r in records)
    loaded = load_known(path, on_error="fail")
    assert len(loaded.records) == len(records) > 20_000


def test_known_stage_lists_the_known_candidates_by_relation(tmp_path):
    """The bundled sample (an empty data root), on a random tiny model: the counts add up."""
    empty = tmp_path / "empty"
    empty.mkdir()
    done = run_stage(
        "known",
        "model=tiny-gpt2",
        "data=counterfact-known",
        "data.limit=30",
        f"paths.results={tmp_path}",
        env={"ROME_DATA": str(empty)},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "known/tiny-gpt2/counterfact-known/summary.json").read_text())
    assert summary["checked"] == 30 and summary["data"]["origin"] == "bundled sample"
    relations = summary["by_relation"]
    assert sum(r["facts"] for r in relations.values()) == 30
    assert sum(r["known"] for r in relations.values()) == summary["known"]
    assert "by relation (known / checked):" in done.stdout
