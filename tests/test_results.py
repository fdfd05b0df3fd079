"""Result files: the unedited-score cache is keyed by what determines the scores."""

from __future__ import annotations

import dataclasses
import json

import torch

from pipeline.app import results
from pipeline.app.results import PreCache, ValueCache, read_jsonl
from pipeline.data.records import load_counterfact
from tests.conftest import ROOT, tiny_model

SAMPLE = ROOT / "data/samples/counterfact-edit_sample.json"


def plain(rows):
    """As read back from the JSONL file (tuples become lists)."""
    return json.loads(json.dumps(rows))


def counting(monkeypatch):
    scored = []
    real = results.score_cases

    def score_cases(lm, cases, **kwargs):
        scored.extend(c.id for c in cases)
        return real(lm, cases, **kwargs)

    monkeypatch.setattr(results, "score_cases", score_cases)
    return scored


def test_pre_scores_miss_for_another_seed_model_or_record_under_the_same_id(tmp_path, monkeypatch):
    cases = load_counterfact(SAMPLE, limit=2).records
    seed0, seed1 = tiny_model("tiny-gpt2", 0), tiny_model("tiny-gpt2", 1)
    scored = counting(monkeypatch)
    first = plain(PreCache(tmp_path, "0of1", seed0).get(cases, 32))
    assert scored == [c.id for c in cases]
    hit = plain(PreCache(tmp_path, "0of1", seed0).get(cases, 32))
    assert hit == first and len(scored) == 2
    other_seed = plain(PreCache(tmp_path, "0of1", seed1).get(cases, 32))
    assert len(scored) == 4 and other_seed != first  # seed 1's model: its own scores
    edited = [dataclasses.replace(cases[0], target_new="Swahili"), cases[1]]
    again = plain(PreCache(tmp_path, "0of1", seed0).get(edited, 32))
    assert scored[4:] == [cases[0].id]  # only the record whose content changed
    assert again[1] == first[1] and again[0] != first[0]
    bf16 = tiny_model("tiny-gpt2", 0)
    bf16.model.to(dtype=torch.bfloat16)
    PreCache(tmp_path, "0of1", bf16).get(cases[:1], 32)
    assert len(scored) == 6  # another dtype


def test_rows_written_before_the_key_existed_are_recomputed(tmp_path, monkeypatch):
    cases = load_counterfact(SAMPLE, limit=1).records
    lm = tiny_model("tiny-gpt2", 0)
    stale = {"id": cases[0].id, "probs": {}, "metrics": {"ES": 123.0}}  # keyed by id only
    results.append_jsonl(tmp_path / "pre-0of1.jsonl", [stale])
    scored = counting(monkeypatch)
    (pre,) = PreCache(tmp_path, "0of1", lm).get(cases, 32)
    assert scored == [cases[0].id] and pre["metrics"]["ES"] != 123.0
    assert all("key" in row for row in read_jsonl([tmp_path / "pre-0of1.jsonl"])[1:])


def test_value_cache_keeps_values_exactly_across_runs(tmp_path):
    delta = torch.randn(7).tolist()  # float32 values, as optimise_values returns them
    first = ValueCache(tmp_path)
    assert first.get("k") is None
    first.put({"k": {"delta": delta, "nll": 0.01, "steps": 9}})
    second = ValueCache(tmp_path)  # another run, or another editor's
    row = second.get("k")
    assert row["steps"] == 9 and row["nll"] == 0.01
    assert torch.equal(torch.tensor(row["delta"]), torch.tensor(delta))


def test_the_paired_change_is_post_minus_pre_case_by_case():
    def record(pre, post):
        return {"pre": {"metrics": {"NS": pre}}, "post": {"metrics": {"NS": post}}}

    nan = float("nan")
    records = [record(1.0, 0.5), record(0.5, 0.5), record(1.0, 0.0), record(nan, 1.0)]
    change = results.paired_change(records, "NS")
    assert change["n"] == 3 and abs(change["mean"] - (-50.0)) < 1e-9  # the NaN case left out
    assert change["low"] < change["mean"] < change["high"] <= 100
    # every case moved by the same amount: an interval of zero width, however far the cases lie
    same = results.paired_change([record(p, p - 0.1) for p in (0.2, 0.9, 0.5)], "NS")
    assert abs(same["mean"] + 10) < 1e-9 and abs(same["high"] - same["low"]) < 1e-6
    assert results.paired_change([record(1.0, 0.0)], "NS")["n"] == 1  # too few for an interval


def test_a_changed_number_in_the_unedited_scores_is_named_and_recomputed(tmp_path, caplog):
    """Rows carry a checksum: a score changed on disk was used silently; now the row is named
    (its file) and scored again, giving the first numbers back."""
    cases = load_counterfact(SAMPLE, limit=2).records
    lm = tiny_model("tiny-gpt2", 0)
    first = plain(PreCache(tmp_path, "0of1", lm).get(cases, 32))
    path = tmp_path / "pre-0of1.jsonl"
    rows = read_jsonl([path])
    rows[0]["metrics"]["ES"] = 1.0 - rows[0]["metrics"]["ES"]  # the changed number
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    again = plain(PreCache(tmp_path, "0of1", lm).get(cases, 32))
    assert again == first
    assert f"{path}: the row of key {rows[0]['key']} fails its checksum" in caplog.text


def test_a_changed_z_is_named_and_not_used(tmp_path, caplog):
    ValueCache(tmp_path).put({"k": {"delta": [0.5, 0.25], "nll": 0.01, "steps": 9}})
    path = tmp_path / "values.jsonl"
    path.write_text(path.read_text().replace("0.25", "0.75"))
    assert ValueCache(tmp_path).get("k") is None  # so the editor optimises z again
    assert f"{path}: the row of key k fails its checksum" in caplog.text
