import copy
import json
import socket
import urllib.error
import urllib.request

import pytest

from pipeline.data import sources
from pipeline.data.records import (
    CounterfactCase,
    KnownFact,
    RecordError,
    load_counterfact,
    load_known,
    load_records,
    take_shard,
)
from pipeline.data.sources import DataNotFoundError, resolve_data_file

ROME_CASE = {
    "case_id": 0,
    "pararel_idx": 2796,
    "requested_rewrite": {
        "prompt": "The mother tongue of {} is",
        "relation_id": "P103",
        "target_new": {"str": "English", "id": "Q1860"},
        "target_true": {"str": "French", "id": "Q150"},
        "subject": "Danielle Darrieux",
    },
    "paraphrase_prompts": [
        "Shayna does this and Yossel goes still and dies. Danielle Darrieux, a native",
        "An album was recorded for Capitol Nashville but never released. Danielle Darrieux spoke the language",
    ],
    "neighborhood_prompts": [
        "The mother tongue of Léon Blum is",
        "The native language of Montesquieu is",
    ],
    "attribute_prompts": ["J.\u00a0R.\u00a0R. Tolkien is a native speaker of"],
    "generation_prompts": ["Danielle Darrieux's mother tongue is"],
}
EASYEDIT_CASE = {
    "case_id": 0,
    "prompt": "The mother tongue of Danielle Darrieux is",
    "target_new": "English",
    "subject": "Danielle Darrieux",
    "ground_truth": "French",
    "rephrase_prompt": "Where Danielle Darrieux is from, people speak the language of",
    "locality_prompt": "Michel Rocard is a native speaker of",
    "locality_ground_truth": "French",
}
KNOWN = {
    "known_id": 7,
    "subject": "Vinson Massif",
    "attribute": "Antarctica",
    "template": "{} is located in the continent",
    "prediction": " of Antarctica.",
    "prompt": "Vinson Massif is located in the continent of",
    "relation_id": "P30",
}


def write(tmp_path, name, records):
    path = tmp_path / name
    path.write_text(json.dumps(records))
    return path


def test_rome_counterfact_schema(tmp_path):
    loaded = load_counterfact(write(tmp_path, "cf.json", [ROME_CASE]))
    (case,) = loaded.records
    assert loaded.schema == "rome"
    assert isinstance(case, CounterfactCase)
    assert case.prompt == "The mother tongue of Danielle Darrieux is"
    assert (case.target_true, case.target_new, case.relation_id) == ("French", "English", "P103")
    assert case.target_new_id == "Q1860"
    assert len(case.paraphrase_prompts) == 2 and len(case.neighborhood_prompts) == 2
    assert case.attribute_prompts and case.generation_prompts


def test_easyedit_counterfact_schema(tmp_path):
    loaded = load_counterfact(write(tmp_path, "cf.json", [EASYEDIT_CASE]))
    (case,) = loaded.records
    assert loaded.schema == "easyedit" and case.schema == "easyedit"
    assert case.template == "The mother tongue of {} is"
    assert case.paraphrase_prompts == (EASYEDIT_CASE["rephrase_prompt"],)
    assert case.neighborhood_prompts == (EASYEDIT_CASE["locality_prompt"],)
    assert case.attribute_prompts == () and case.generation_prompts == ()


def test_both_schemas_give_the_same_internal_form(tmp_path):
    rome = load_counterfact(write(tmp_path, "a.json", [ROME_CASE])).records[0]
    easy = load_counterfact(write(tmp_path, "b.json", [EASYEDIT_CASE])).records[0]
    for field in ("id", "subject", "template", "target_true", "target_new"):
        assert getattr(rome, field) == getattr(easy, field)


def test_shared_easyedit_files_load(data_root):
    for split, count in (("train", 10_000), ("edit", 10_000), ("val", 1_919)):
        loaded = load_counterfact(data_root / "counterfact_easyedit" / f"counterfact-{split}.json")
        assert loaded.total == count and not loaded.skipped


def test_known_facts(tmp_path, data_root):
    (fact,) = load_known(write(tmp_path, "k.json", [KNOWN])).records
    assert fact == KnownFact(7, "Vinson Massif", KNOWN["prompt"], "Antarctica", "P30")
    loaded = load_known(data_root / "known_1000.json")
    assert loaded.total == 1209 and not loaded.skipped


def _mutate(record, path, value):
    bad = copy.deepcopy(record)
    target = bad
    *parents, last = path.split(".")
    for part in parents:
        target = target[part]
    if value is KeyError:
        del target[last]
    else:
        target[last] = value
    return bad


def _renumbered(record, offset=100):
    key = "known_id" if "known_id" in record else "case_id"
    return {**record, key: record[key] + offset}


BAD_KNOWN = [
    ("subject", KeyError, "missing"),
    ("subject", "", "empty"),
    ("subject", "Mont Blanc", "not in the prompt"),
    ("attribute", "  ", "empty"),
    ("attribute", 3, "expected a string"),
    ("known_id", "seven", "expected an integer"),
]
BAD_ROME = [
    ("requested_rewrite.subject", KeyError, "missing"),
    # The template has no subject; the paraphrases name it and no longer match.
    ("requested_rewrite.subject", "Zinedine Zidane", "not in the prompt", "paraphrase_prompts"),
    ("requested_rewrite.target_new.str", "", "empty"),
    ("requested_rewrite.target_new.str", "French", "equals the true answer"),
    ("requested_rewrite.prompt", "The mother tongue is", "placeholder"),
    ("paraphrase_prompts", [1, 2], "list of strings"),
]
BAD_EASYEDIT = [
    ("subject", KeyError, "missing"),
    ("subject", "Zinedine Zidane", "not in the prompt"),
    ("target_new", "", "empty"),
    ("target_new", " French", "equals the true answer"),
    ("ground_truth", ["French"], "expected a string"),
    ("locality_ground_truth", "German", "differs from ground_truth"),
]


@pytest.mark.parametrize(
    "loader,record,field,value,reason,blamed",
    [(load_known, KNOWN, *bad, bad[0]) for bad in BAD_KNOWN]
    + [
        (load_counterfact, ROME_CASE, *bad[:3], bad[-1] if len(bad) == 4 else bad[0])
        for bad in BAD_ROME
    ]
    + [(load_counterfact, EASYEDIT_CASE, *bad, bad[0]) for bad in BAD_EASYEDIT],
)
def test_bad_records_fail_with_file_record_and_field(
    tmp_path, loader, record, field, value, reason, blamed
):
    good = copy.deepcopy(record)
    path = write(tmp_path, "data.json", [good, _mutate(record, field, value), _renumbered(good)])
    with pytest.raises(RecordError) as error:
        loader(path)
    message = str(error.value)
    assert str(path) in message and "record 1" in message and f"'{blamed}'" in message
    assert reason in message
    skipped = loader(path, on_error="skip")
    assert len(skipped.records) == 2 and len(skipped.skipped) == 1
    assert skipped.report()["skipped_records"][0]["field"] == blamed


def test_wrong_container_types(tmp_path):
    with pytest.raises(ValueError, match="JSON list"):
        load_known(write(tmp_path, "k.json", {"known_id": 1}))
    with pytest.raises(RecordError, match="expected an object"):
        load_known(write(tmp_path, "k.json", [KNOWN, 5]))
    with pytest.raises(ValueError, match="unknown CounterFact schema"):
        load_counterfact(write(tmp_path, "c.json", [{"foo": 1}]))
    with pytest.raises(FileNotFoundError, match="make data"):
        load_known(tmp_path / "missing.json")
    with pytest.raises(ValueError, match="on_error"):
        load_known(write(tmp_path, "k.json", [KNOWN]), on_error="ignore")
    with pytest.raises(ValueError, match="data kind"):
        load_records("mquake", tmp_path)


@pytest.mark.parametrize("loader,record", [(load_known, KNOWN), (load_counterfact, EASYEDIT_CASE)])
def test_a_duplicate_id_is_a_bad_record_not_a_replacement(tmp_path, loader, record):
    """ids [0, 1, 4, 1]: the second 1 would replace the first's results and count twice."""
    key = "known_id" if loader is load_known else "case_id"
    ids = [0, 1, 4, 1]
    path = write(tmp_path, "d.json", [{**record, key: i} for i in ids])
    loaded = loader(path, on_error="skip")
    assert [r.id for r in loaded.records] == [0, 1, 4] and loaded.indices == [0, 1, 2]
    (error,) = loaded.skipped
    assert (error.index, error.record_id, error.field) == (3, 1, key)
    assert "duplicate id 1 (already used by record 1)" in error.reason
    assert loaded.report()["skipped"] == 1 and loaded.total == 4
    with pytest.raises(RecordError, match="record 3 .*duplicate id 1"):
        loader(path, on_error="fail")


def test_the_schema_comes_from_the_file_not_its_first_record(tmp_path):
    broken = {k: v for k, v in EASYEDIT_CASE.items() if k != "ground_truth"}
    records = [broken] + [{**EASYEDIT_CASE, "case_id": i} for i in (1, 2)]
    loaded = load_counterfact(write(tmp_path, "c.json", records), on_error="skip")
    assert loaded.schema == "easyedit" and [r.id for r in loaded.records] == [1, 2]
    (error,) = loaded.skipped
    assert (error.index, error.field, error.reason) == (0, "ground_truth", "missing")
    rome_first = [5, ROME_CASE, {**ROME_CASE, "case_id": 1}]
    assert load_counterfact(write(tmp_path, "r.json", rome_first), on_error="skip").schema == "rome"


def test_limit_and_shards(tmp_path):
    records = [dict(KNOWN, known_id=i) for i in range(10)]
    assert len(load_known(write(tmp_path, "k.json", records), limit=3).records) == 3
    shards = [take_shard(range(10), i, 3) for i in range(3)]
    assert sorted(x for shard in shards for x in shard) == list(range(10))
    with pytest.raises(ValueError):
        take_shard(range(3), 3, 3)


def test_resolve_data_file_order(tmp_path):
    entry = {"file": "known_1000.json", "sample": "known_1000_sample.json", "path": None}
    path, origin = resolve_data_file(entry, tmp_path)
    assert origin == "bundled sample" and path.name == "known_1000_sample.json"
    (tmp_path / "known_1000.json").write_text("[]")
    assert resolve_data_file(entry, tmp_path) == (tmp_path / "known_1000.json", "data root")
    explicit = write(tmp_path, "mine.json", [])
    assert resolve_data_file({**entry, "path": str(explicit)}, tmp_path)[1] == "path"
    with pytest.raises(DataNotFoundError, match="make data"):
        resolve_data_file({"file": "counterfact.json", "sample": None}, tmp_path)


def unreachable(*args, **kwargs):
    raise urllib.error.URLError(socket.gaierror(-2, "Name or service not known"))


def test_a_download_offline_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(urllib.request, "urlopen", unreachable)
    entry = {"file": "counterfact.json", "url": "https://example.org/cf.json", "download": True}
    with pytest.raises(DataNotFoundError) as caught:
        resolve_data_file(entry, tmp_path)
    message = str(caught.value)
    assert "\n" not in message and f"not in the data root {tmp_path}" in message
    assert "https://example.org/cf.json" in message and "Name or service not known" in message
    for remedy in ("make data", "ROME_DATA=", "data.path="):
        assert remedy in message
    assert not list(tmp_path.iterdir())  # no partial file left behind


def test_make_data_offline_names_each_failure_and_the_way_out(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(urllib.request, "urlopen", unreachable)
    (tmp_path / "known_1000.json").write_text("[]")
    assert sources.main(["--root", str(tmp_path), "--no-wikitext"]) == 1
    out = capsys.readouterr().out
    assert "known_1000.json" in out and "present" in out
    assert "failed: https://rome.baulab.info/data/dsets/counterfact.json (URLError:" in out
    assert "ROME_DATA=" in out and "make data" in out


def test_bundled_samples_are_valid():
    entry = {"file": "nothing-here.json"}
    known, _ = resolve_data_file({**entry, "sample": "known_1000_sample.json"}, "/nonexistent")
    cases, _ = resolve_data_file(
        {**entry, "sample": "counterfact-edit_sample.json"}, "/nonexistent"
    )
    assert len(load_known(known).records) == 300
    assert len(load_counterfact(cases).records) == 300


def test_reject_moves_records_a_later_check_refuses_to_skipped_with_their_place(tmp_path):
    records = [{**KNOWN, "known_id": i} for i in range(4)]
    records[1]["subject"] = "Nobody"  # bad in the file itself
    loaded = load_known(write(tmp_path, "k.json", records), on_error="skip")
    rejected = loaded.reject(lambda f: ("prompt", "too long") if f.id == 2 else None, "skip")
    assert [r.id for r in loaded.records] == [0, 3] and loaded.indices == [0, 3]
    assert [(e.index, e.field) for e in rejected] == [(2, "prompt")]
    assert [e.index for e in loaded.skipped] == [1, 2] and loaded.report()["skipped"] == 2
    with pytest.raises(RecordError, match="record 0 .*'prompt': too long"):
        loaded.reject(lambda f: ("prompt", "too long"), "fail")


ZSRE = {
    "subject": "IAAF Combined Events Challenge",
    "src": "When was the inception of IAAF Combined Events Challenge?",
    "pred": "2011",
    "rephrase": "When was the IAAF Combined Events Challenge launched?",
    "alt": "2006",
    "answers": ["1998"],
    "loc": "nq question: what is the name of the last episode of spongebob",
    "loc_ans": "The String",
    "cond": "2011 >> 2006 || When was the inception of IAAF Combined Events Challenge?",
    "portability": {"New Answer": "Athletics"},
}


def test_zsre_records_become_romes_zsre_requests(tmp_path):
    path = write(tmp_path, "z.json", [ZSRE, {**ZSRE, "subject": "Nobody"}])
    loaded = load_records("zsre", path, on_error="skip")
    (case,) = loaded.records
    assert case.id == 0 and case.template == "When was the inception of {}?"
    assert case.prompt == ZSRE["src"] and case.target_new == "1998"  # answers[0], as ROME
    assert case.paraphrase_prompts == (ZSRE["rephrase"],)
    assert case.neighborhood_prompt == ZSRE["loc"] + "?"
    assert case.neighborhood_answer == "The String" and case.target_true is None
    assert [(e.index, e.field) for e in loaded.skipped] == [(1, "subject")]
    assert load_records("zsre", path, on_error="skip", target="alt").records[0].target_new == "2006"
    with pytest.raises(ValueError, match="zsRE target"):
        load_records("zsre", path, target="pred")


def test_zsre_files(data_root):
    entry = {"file": "zsre_eval/zsre_mend_eval_portability_gpt4.json", "sample": None}
    loaded = load_records("zsre", resolve_data_file(entry, data_root)[0], on_error="fail")
    assert len(loaded.records) == 1037
    sample = load_records("zsre", sources.BUNDLED / "zsre_eval_sample.json", on_error="fail")
    assert sample.records == loaded.records[:10]


def test_every_data_config_passes_the_schema_and_names_a_loader():
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from pipeline.app.schema import validate_config
    from pipeline.data.records import LOADERS
    from tests.conftest import ROOT

    names = sorted(p.stem for p in (ROOT / "conf/data").glob("*.yaml"))
    assert {"counterfact-first1000", "counterfact-mcf", "zsre"} <= set(names)
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        for name in names:  # under a stage that reads its kind (known facts: the trace)
            kind = OmegaConf.load(ROOT / f"conf/data/{name}.yaml").kind
            cfg = compose("trace" if kind == "known" else "evaluate", overrides=[f"data={name}"])
            validate_config(cfg)
            assert cfg.data.kind in LOADERS
            assert cfg.data.get("derived") in (None, *sources.DERIVED)
    mcf = (ROOT / "conf/data/counterfact-mcf.yaml").read_text()
    assert "NOT a random sample" in mcf  # said wherever the 1,386 file is used
