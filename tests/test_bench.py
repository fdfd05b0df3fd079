"""The benchmark suite's mechanics on a tiny model: every script runs and reports (no timing
assertions: the speed-ups are measured by `make bench`, not asserted)."""

import json
import os
import subprocess
import sys

from tests.conftest import CACHE, ROOT
from tests.test_stats_stage import TEXT


def test_make_bench_runs_every_benchmark_and_writes_the_table(tmp_path):
    (tmp_path / "data/wikipedia").mkdir(parents=True)
    (tmp_path / "data/wikipedia/text.txt").write_text(TEXT * 20)
    markdown = tmp_path / "BENCHMARKS.md"
    markdown.write_text("# Benchmarks\n")
    env = {
        **os.environ,
        "ROME_DATA": str(tmp_path / "data"),
        "ROME_CACHE": str(CACHE),
        "ROME_WANDB_MODE": "disabled",
    }
    argv = [sys.executable, "scripts/bench.py", "--model", "tiny-gpt2", "--layer", "1"]
    argv += ["--cases", "2", "--stats-tokens", "500", "--out", str(tmp_path / "bench")]
    argv += ["--markdown", str(markdown)]
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (bench,) = (tmp_path / "bench").glob("*/bench.json")
    results = json.loads(bench.read_text())
    assert set(results) == {"trace", "stats", "edit", "eval"}
    assert results["trace"]["reference"]["hidden"]["max_difference"] < 1e-4
    assert results["trace"]["floor"]["fraction"] > 0 and results["eval"]["floor"]["fraction"] > 0
    assert results["stats"]["max_relative_difference"] < 1e-6
    assert results["eval"]["max_difference"] < 1e-5
    lines = markdown.read_text().splitlines()
    rows = [line for line in lines if line.startswith("| ") and "tiny-gpt2" in line]
    assert [row.split(" | ")[0] for row in rows] == ["| trace", "| stats", "| edit", "| eval"]
    assert "bench:cpu:begin" in markdown.read_text()


def test_scaling_benchmark_writes_every_panel(tmp_path):
    argv = [sys.executable, "scripts/bench_scaling.py", "--base", "tiny-gpt2", "--no-eval"]
    argv += ["--sizes", "tiny-gpt2", "tiny-llama", "--out", str(tmp_path)]
    env = {**os.environ, "ROME_CACHE": str(CACHE)}
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    scaling = json.loads((tmp_path / "scaling.json").read_text())
    assert [row[0] for row in scaling["prompts"]] == [1, 2, 4]
    assert [row[0] for row in scaling["model_size"]] == ["tiny-gpt2", "tiny-llama"]
    assert [row[0] for row in scaling["shards"]] == [1, 2]
    assert (tmp_path / "scaling.png").stat().st_size > 10_000


def test_memory_benchmark_measures_each_stage_and_estimates_a_larger_model(tmp_path):
    (tmp_path / "data/wikipedia").mkdir(parents=True)
    (tmp_path / "data/wikipedia/text.txt").write_text(TEXT * 20)
    argv = [sys.executable, "scripts/bench_memory.py", "--models", "tiny-gpt2", "tiny-llama"]
    argv += ["--predict", "gpt2-xl", "--data", str(tmp_path / "data")]
    argv += ["--json", str(tmp_path / "memory.json")]
    env = {**os.environ, "ROME_CACHE": str(CACHE)}
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    memory = json.loads((tmp_path / "memory.json").read_text())
    stages = ["load", "stats", "trace", "evaluate"]
    for model in ("tiny-gpt2", "tiny-llama"):
        peaks = memory["measured_gib"][model]
        assert list(peaks) == stages and all(peak > 0.1 for peak in peaks.values())
        assert peaks["evaluate"] >= peaks["load"]  # a stage holds at least the loaded model
    xl = memory["shapes"]["gpt2-xl"]
    assert (xl["layers"], xl["width"]) == (48, 1600) and 1.5e9 < xl["parameters"] < 1.6e9
    weights = xl["parameters"] * 4 / 2**30
    assert all(memory["estimated_gib"]["gpt2-xl"][s] > weights for s in stages)


def test_kn_benchmark_times_both_ways_and_finds_the_same_scores(tmp_path):
    out = tmp_path / "kn.json"
    argv = [sys.executable, "scripts/bench_kn.py", "--model", "tiny-llama", "--requests", "2"]
    argv += ["--json", str(out)]
    env = {**os.environ, "ROME_CACHE": str(CACHE)}
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["requests"] == 2 and result["max_relative_difference"] < 1e-4
    assert result["whole_prompt_seconds_per_request"] > 0 and result["speedup"] > 0
    assert "speed-up:" in done.stdout
