"""The tracing stage end to end on a tiny model: files per prompt, shards, resume, figures."""

import json

from PIL import Image

from tests.conftest import ROOT
from tests.test_stages import last_line, merge, run_stage

TINY = ["model=tiny-gpt2", "trace.facts=all", "data.limit=12", "trace.limit=4", "trace.samples=3"]


def averages(results, model="tiny-gpt2"):
    return json.loads((results / "trace" / model / "known_1000" / "averages.json").read_text())


def test_sharded_trace_equals_unsharded_and_reruns_skip(tmp_path):
    whole, sharded = tmp_path / "whole", tmp_path / "sharded"
    done = run_stage("trace", *TINY, f"paths.results={whole}")
    assert done.returncode == 0, done.stderr[-3000:]
    out_dir = whole / "trace/tiny-gpt2/known_1000"
    assert last_line(done.stdout) == f"results: {out_dir}"
    assert "traced 4 prompts" in done.stdout
    assert len(list((out_dir / "prompts").glob("*.json"))) == 4

    for index in (0, 1):
        part = run_stage(
            "trace", *TINY, f"paths.results={sharded}", f"shard.index={index}", "shard.count=2"
        )
        assert part.returncode == 0, part.stderr[-3000:]
        assert "traced 2 prompts" in part.stdout
    merged = merge(sharded / "trace/tiny-gpt2/known_1000")
    assert merged.returncode == 0, merged.stderr[-3000:]
    assert averages(sharded) == averages(whole)

    again = run_stage("trace", *TINY, f"paths.results={whole}")
    assert again.returncode == 0 and "prompts in" not in again.stdout  # nothing left to trace
    assert "4 already traced" in again.stdout
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["traced"] == 4 and summary["complete"]
    # the time of the trace is the prompts' own, summed over sittings, not this rerun's
    prompts = [json.loads(p.read_text()) for p in (out_dir / "prompts").glob("*.json")]
    assert summary["seconds"] == round(sum(p["seconds"] for p in prompts), 1) > 0
    first = averages(whole)
    assert first["kinds"]["mlp"]["count"][2] == 4  # every prompt has a last subject token
    for name in ("average_mlp", "last_subject_aie", "severed", "example_0_hidden"):
        image = Image.open(out_dir / "figures" / f"{name}.png")
        assert image.size[0] > 200 and image.size[1] > 150
        assert len(set(image.convert("L").getdata())) > 10  # not blank
        assert (out_dir / "figures" / f"{name}.pdf").stat().st_size > 1000


def test_a_missing_shard_stops_the_merge_and_says_what_is_missing(tmp_path):
    part = run_stage("trace", *TINY, f"paths.results={tmp_path}", "shard.index=0", "shard.count=2")
    assert part.returncode == 0, part.stderr[-3000:]
    out_dir = tmp_path / "trace/tiny-gpt2/known_1000"
    assert "python -m pipeline.merge" in part.stdout and not (out_dir / "summary.json").exists()
    refused = merge(out_dir)
    assert refused.returncode != 0
    assert "2 of 4 prompts are not finished" in refused.stderr
    assert "shard 1 of 2: 2 prompts missing" in refused.stderr
    assert not (out_dir / "summary.json").exists()
    partial = merge(out_dir, "--allow-partial")
    assert partial.returncode == 0, partial.stderr[-3000:]
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["traced"] == 2 and summary["missing"] == 2 and not summary["complete"]
    assert list(summary["missing_by_shard"]) == ["1"]


def test_a_rerun_with_other_settings_is_refused(tmp_path):
    done = run_stage("trace", *TINY, f"paths.results={tmp_path}", "trace.limit=1")
    assert done.returncode == 0, done.stderr[-3000:]
    other = run_stage("trace", *TINY, f"paths.results={tmp_path}", "trace.samples=5")
    assert other.returncode != 0
    assert "holds results of another configuration (trace.samples: 3 -> 5)" in other.stderr


def test_known_facts_from_another_data_setting_are_not_reused(tmp_path):
    from omegaconf import OmegaConf

    from pipeline.trace import _same_inputs

    cfg = OmegaConf.create(
        {
            "model": {"name": "m"},
            "data": {"file": "known_1000.json", "limit": None},
            "dtype": "float32",
            "paths": {"data": "${oc.env:HOME}"},
        }
    )
    saved = tmp_path / "config.yaml"
    saved.write_text(OmegaConf.to_yaml(cfg, resolve=True))
    assert _same_inputs(saved, cfg)
    cfg.data.limit = 40
    assert not _same_inputs(saved, cfg)
    assert not _same_inputs(tmp_path / "missing.yaml", cfg)


def test_a_damaged_prompt_file_is_named_and_traced_again(tmp_path):
    done = run_stage("trace", *TINY, f"paths.results={tmp_path}")
    assert done.returncode == 0, done.stderr[-3000:]
    out_dir = tmp_path / "trace/tiny-gpt2/known_1000"
    first = averages(tmp_path)
    victim = sorted((out_dir / "prompts").glob("*.json"))[1]
    victim.write_text(victim.read_text()[:40])  # torn: counted as done before, then a crash
    refused = merge(out_dir)
    assert refused.returncode != 0
    assert f"{victim}: unreadable" in refused.stderr and "1 of 4 prompts are not finished" in (
        refused.stderr
    )
    again = run_stage("trace", *TINY, f"paths.results={tmp_path}")
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"tracing 1 damaged prompt files again: [{int(victim.stem)}]" in again.stdout
    assert "traced 1 prompts" in again.stdout and averages(tmp_path) == first


def test_bad_records_of_the_data_trace_loads_itself_are_counted_and_listed(tmp_path):
    records = json.loads((ROOT / "data/samples/known_1000_sample.json").read_text())[:6]
    records[2]["subject"] = "Nobody At All"
    records[4]["known_id"] = records[0]["known_id"]  # a duplicate id
    data = tmp_path / "known.json"
    data.write_text(json.dumps(records))
    done = run_stage("trace", *TINY, f"data.path={data}", f"paths.results={tmp_path}")
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "trace/tiny-gpt2/known_1000/summary.json").read_text())
    assert summary["skipped"] == 2 and summary["data"]["total"] == 6
    assert [r["index"] for r in summary["data"]["skipped_records"]] == [2, 4]
    assert "skipped a bad record" in done.stdout + done.stderr


def test_paired_contrasts_are_per_prompt_differences_at_the_average_peaks():
    """The differences the report's trace verdicts rest on, computed prompt by prompt."""
    import numpy as np

    from pipeline.trace import aggregate

    generator = np.random.default_rng(0)
    spans = [(1, 3), (0, 2), (2, 4), (1, 5)]  # the last subject ends the prompt: no last token
    records = [
        {
            "subject_span": list(span),
            "clean": 0.5,
            "corrupted": 0.1,
            "kinds": {k: generator.uniform(size=(5, 6)).tolist() for k in ("mlp", "attn")},
            "severed": {k: generator.uniform(size=6).tolist() for k in ("none", "mlp", "attn")},
        }
        for span in spans
    ]
    out = aggregate(records, ["mlp", "attn"])
    mlp = np.asarray(out["kinds"]["mlp"]["mean"])
    subject_layer, last_layer = int(np.argmax(mlp[2])), int(np.argmax(mlp[5]))
    site = out["paired"]["mlp_site"]
    assert site["minus"] == [["last_subject", subject_layer], ["last", last_layer]]
    expected = [
        np.asarray(r["kinds"]["mlp"])[s[1] - 1, subject_layer]
        - np.asarray(r["kinds"]["mlp"])[-1, last_layer]
        for r, s in zip(records[:3], spans[:3], strict=True)
    ]
    assert site["n"] == 3 and np.isclose(site["mean"], np.mean(expected))
    assert site["low"] < site["mean"] < site["high"]
    severed = out["paired"]["severed"]
    expected = [
        np.mean(np.subtract(r["severed"]["attn"], r["severed"]["mlp"])[:3]) for r in records
    ]
    assert severed["layers"] == [0, 3] and severed["n"] == 4
    assert np.isclose(severed["mean"], np.mean(expected))
