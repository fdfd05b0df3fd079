"""The join of CounterFact's first 1,000 records (pipeline.data.counterfact_join): the real files
where the data root has them, and the failures on small hand-made roots."""

import json
from pathlib import Path

import pytest

from pipeline.core import files
from pipeline.data import counterfact_join as cj
from pipeline.data.derived import provenance
from pipeline.data.records import load_counterfact
from pipeline.data.sources import BUNDLED, derived_provenance, resolve_data_file

ENTRY = {
    "name": cj.NAME,
    "file": cj.PARTS_DIR,
    "derived": cj.NAME,
    "sample": "counterfact-first1000_sample.json",
}
PROMPT_LISTS = ("paraphrase_prompts", "neighborhood_prompts", "attribute_prompts")


@pytest.fixture(scope="module")
def joined(data_root, tmp_path_factory):
    if cj.missing_sources(data_root):
        pytest.skip(f"the data root lacks {cj.missing_sources(data_root)}")
    cache = tmp_path_factory.mktemp("cache")
    path, origin = resolve_data_file(ENTRY, data_root, cache)
    assert origin == "derived" and path.parent == cache / "data"
    return path


def test_case_0_is_danielle_darrieux_with_its_ten_neighbours(joined):
    records = json.loads(joined.read_text())
    first = records[0]
    assert first["case_id"] == 0
    assert first["requested_rewrite"] == {
        "prompt": "The mother tongue of {} is",
        "subject": "Danielle Darrieux",
        "target_new": {"str": "English"},
        "target_true": {"str": "French"},
        "relation_id": "P103",
    }
    assert len(first["neighborhood_prompts"]) == 10
    assert first["neighborhood_prompts"][0] == "The mother tongue of Léon Blum is"


def test_every_record_is_joined_once_in_the_full_schema(joined):
    records = json.loads(joined.read_text())
    ids = [r["case_id"] for r in records]
    # one EasyEdit match per record (the join raises otherwise), each a different case
    assert len(records) == 1000 and len(set(ids)) == 1000 and ids == sorted(ids)
    assert ids[-1] == 1085  # 0..1085 less the Hugging Face test split's ids
    sizes = {tuple(len(r[k]) for k in (*PROMPT_LISTS, "generation_prompts")) for r in records}
    assert sizes == {(2, 10, 10, 10)}
    loaded = load_counterfact(joined, on_error="fail")
    assert loaded.schema == "rome" and len(loaded.records) == 1000


def test_the_58_cases_shared_with_the_1386_file_are_identical(joined, data_root):
    ours = {r["case_id"]: r for r in json.loads(joined.read_text())}
    mcf = json.loads(
        (data_root / cj.PARTS_DIR)
        .parent.joinpath("multi_counterfact_identical2_all_1386.json")
        .read_text()
    )
    shared = [r for r in mcf if r["case_id"] in ours]
    assert len(shared) == 58
    for theirs in shared:
        mine = ours[theirs["case_id"]]
        for key in (*PROMPT_LISTS, "generation_prompts"):
            assert mine[key] == theirs[key], (theirs["case_id"], key)
        rewrite = theirs["requested_rewrite"]
        assert mine["requested_rewrite"]["prompt"] == rewrite["prompt"]
        assert mine["requested_rewrite"]["relation_id"] == rewrite["relation_id"]
        for target in ("target_new", "target_true"):
            assert mine["requested_rewrite"][target]["str"] == rewrite[target]["str"]


def test_the_derived_file_records_its_digest_and_sources(joined, data_root):
    meta = provenance(joined)
    assert meta["derived"] is True and meta["sha256"] == files.sha256_file(joined)
    assert meta["sources"] == cj.source_digests(data_root) and len(meta["sources"]) == 7
    assert derived_provenance(joined) == {"derived": True, "sources": meta["sources"]}
    assert derived_provenance(BUNDLED / "counterfact-edit_sample.json") == {}
    mtime = joined.stat().st_mtime_ns
    assert cj.build(data_root, joined.parent.parent) == joined  # found, not rebuilt
    assert joined.stat().st_mtime_ns == mtime


def test_the_bundled_sample_is_the_first_ten_joined_cases(joined):
    sample = json.loads((BUNDLED / "counterfact-first1000_sample.json").read_text())
    assert sample == json.loads(joined.read_text())[:10]


def test_without_the_sources_the_entry_falls_back_to_its_sample(tmp_path):
    path, origin = resolve_data_file(ENTRY, tmp_path, tmp_path / "cache")
    assert origin == "bundled sample" and path == BUNDLED / ENTRY["sample"]
    loaded = load_counterfact(path, on_error="fail")
    assert len(loaded.records) == 10 and all(
        len(c.generation_prompts) == 10 for c in loaded.records
    )
    assert not (tmp_path / "cache").exists()


# A hand-made data root of two records: the failures name the record.


def small_root(tmp_path: Path, easyedit: list[dict]) -> Path:
    root = tmp_path / "root"
    parts = root / cj.PARTS_DIR
    parts.mkdir(parents=True)
    subjects = [
        ("Danielle Darrieux", "P103", "French", "English"),
        ("Lyon", "P190", "Beirut", "Manila"),
    ]
    lines = {name: [] for name in cj.PARTS}
    for subject, relation, true, new in subjects:
        triple = {"subject": subject, "relation": relation, "object": true}
        lines["triples.jsonl"].append(triple)
        lines["edits.jsonl"].append(
            {"original": triple, "target_new_object": new, "prompt": f"{subject} g0"}
        )
        for family, count in cj.ALIGNED:
            lines["aligned_facts.jsonl"] += [
                {"prompt": f"{family} {i}", "related_to_subject": subject, "category": family}
                for i in range(count)
            ]
        for family, count in cj.DISTRACTORS:
            lines["distractors.jsonl"] += [
                {"prompt": f"{subject} {family[0]}{i}", "subject": subject, "category": family}
                for i in range(count)
            ]
    for name, rows in lines.items():
        (parts / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    for i, name in enumerate(cj.EASYEDIT):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(easyedit if i == 0 else []))
    return root


def easyedit(case_id, subject, true, new):
    return {
        "case_id": case_id,
        "prompt": f"What {subject} is",
        "subject": subject,
        "ground_truth": true,
        "target_new": new,
    }


DARRIEUX = easyedit(0, "Danielle Darrieux", "French", "English")
LYON = easyedit(4, "Lyon", "Beirut", "Manila")


def test_a_small_root_joins(tmp_path):
    records = cj.join(small_root(tmp_path, [LYON, DARRIEUX]))
    assert [r["case_id"] for r in records] == [0, 4]
    assert records[1]["requested_rewrite"]["prompt"] == "What {} is"
    assert records[1]["paraphrase_prompts"] == ["Lyon p0", "Lyon p1"]
    assert records[1]["generation_prompts"][0] == "Lyon g0"


@pytest.mark.parametrize(
    "records,count", [([DARRIEUX], 0), ([DARRIEUX, LYON, {**LYON, "case_id": 9}], 2)]
)
def test_a_triple_matching_zero_or_several_records_is_an_error_naming_it(tmp_path, records, count):
    root = small_root(tmp_path, records)
    with pytest.raises(cj.JoinError, match=rf"record 1 \(subject 'Lyon'\).* matches {count} "):
        cj.build(root, tmp_path / "cache")
    assert not list((tmp_path / "cache").rglob("*.json"))  # nothing written


def test_part_files_out_of_order_are_an_error(tmp_path):
    root = small_root(tmp_path, [LYON, DARRIEUX])
    path = root / cj.PARTS_DIR / "distractors.jsonl"
    rows = path.read_text().splitlines()
    path.write_text("\n".join(rows[1:] + rows[:1]) + "\n")
    with pytest.raises(cj.JoinError, match="record 0 .*not in record order"):
        cj.join(root)


def test_evaluate_builds_the_derived_file_and_records_it_in_run_json(tmp_path):
    from tests.test_stages import run_stage

    root = small_root(tmp_path, [LYON, DARRIEUX])
    done = run_stage(
        "evaluate",
        "model=tiny-gpt2",
        "editor=none",
        "data=counterfact-first1000",
        "eval.max_new_tokens=2",
        f"paths.data={root}",
        f"paths.cache={tmp_path / 'cache'}",
        f"paths.results={tmp_path / 'results'}",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "results/evaluate/tiny-gpt2/counterfact-first1000/none"
    data = json.loads((out / "run.json").read_text())["data"]
    built = cj.target_path(tmp_path / "cache", cj.source_digests(root))
    assert {k: data[k] for k in ("path", "sha256", "derived")} == {
        "path": str(built),
        "sha256": files.sha256_file(built),
        "derived": True,
    }
    assert data["sources"] == cj.source_digests(root)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["data"]["origin"] == "derived" and summary["data"]["derived"] is True
    assert summary["n_cases"] == 2 and summary["schema"] == "rome"
    assert summary["post"]["GE"]["n"] == 2  # the generation prompts came through the join


def test_the_demos_counterfact_data_carries_generation_prompts_without_a_data_root(tmp_path):
    import re

    import yaml

    from tests.conftest import ROOT

    makefile = (ROOT / "Makefile").read_text()
    name = re.search(r"^DEMO_DATA \?= (\S+)$", makefile, re.M).group(1)
    cases = int(re.search(r"^DEMO_CASES \?= (\d+)$", makefile, re.M).group(1))
    assert "data=$(DEMO_DATA)" in makefile and "eval_data=$(DEMO_DATA)" in makefile
    entry = yaml.safe_load((ROOT / "conf/data" / f"{name}.yaml").read_text())
    path, origin = resolve_data_file(entry, tmp_path, tmp_path / "cache")
    assert origin == "bundled sample"
    loaded = load_counterfact(path, on_error="fail", limit=cases)
    assert len(loaded.records) == cases  # GE on every demo case
    assert all(len(c.generation_prompts) == 10 for c in loaded.records)


def test_the_data_command_builds_the_derived_file_where_its_sources_are(tmp_path, capsys):
    from pipeline.data import sources

    root = small_root(tmp_path, [LYON, DARRIEUX])
    cache = tmp_path / "cache"
    assert sources.main(["--root", str(root), "--cache", str(cache), "--derived-only"]) == 0
    built = cj.target_path(cache, cj.source_digests(root))
    out = capsys.readouterr().out
    assert f"derived: {built} (sha256 {files.sha256_file(built)})" in out
    assert sources.main(["--root", str(tmp_path), "--cache", str(cache), "--derived-only"]) == 0
    assert f"not built: missing {cj.PARTS_DIR}/triples.jsonl" in capsys.readouterr().out
