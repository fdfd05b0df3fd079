"""The algorithms and the benchmarks import with torch and transformers alone (what a bare GPU
machine has)."""

import subprocess
import sys

from tests.conftest import ROOT

CHECK = """
import sys
import pipeline.tracing, pipeline.rome, pipeline.second_moment, pipeline.evaluation
import pipeline.models, pipeline.tokens, metrics.counterfact, metrics.generation
from metrics.counterfact import case_metrics
sys.path.insert(0, "scripts")
import bench, bench_edit, bench_eval, bench_stats, bench_trace  # make bench-gpu's scripts
print(case_metrics({"rewrite": [(0.6, 0.4)]})["ES"])
extra = {"scipy", "hydra", "omegaconf", "wandb", "matplotlib", "datasets"}
print(sorted(extra & {name.split(".")[0] for name in sys.modules}))
"""


def test_algorithms_need_only_torch_and_transformers():
    done = subprocess.run(
        [sys.executable, "-c", CHECK], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split("\n")[:2] == ["1.0", "[]"]
