"""The layering: the algorithms (`pipeline.core`) and the benchmarks import with torch and
transformers alone (what a bare GPU machine has), and the algorithms never reach up into the
stages or their plumbing (`pipeline.app`)."""

import subprocess
import sys

from tests.conftest import ROOT

HEAVY = {"scipy", "hydra", "omegaconf", "wandb", "matplotlib", "datasets", "nltk"}

CORE = """
import importlib, pkgutil, sys
import pipeline.core
modules = [m.name for m in pkgutil.walk_packages(pipeline.core.__path__, "pipeline.core.")]
for name in modules:
    importlib.import_module(name)
import metrics.counterfact, metrics.generation
from metrics.counterfact import case_metrics
print(case_metrics({"rewrite": [(0.6, 0.4)]})["ES"])
print(len(modules))
print(sorted(HEAVY & {name.split(".")[0] for name in sys.modules}))
allowed = ("pipeline.core", "pipeline.data.records", "pipeline.data")
print(sorted(n for n in sys.modules if n.startswith("pipeline.") and not n.startswith(allowed)))
"""

BENCH = """
import sys
sys.path.insert(0, "scripts")
import bench, bench_edit, bench_eval, bench_stats, bench_trace  # make bench-gpu's scripts
print(sorted(HEAVY & {name.split(".")[0] for name in sys.modules}))
"""


def run(code: str) -> list[str]:
    done = subprocess.run(
        [sys.executable, "-c", f"HEAVY = {HEAVY!r}\n{code}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.splitlines()


def test_algorithms_need_only_torch_and_transformers_and_never_import_the_stages():
    es, n_modules, heavy, upward = run(CORE)
    assert es == "1.0"
    assert int(n_modules) >= 15  # every module of pipeline.core was imported
    assert heavy == "[]"
    assert upward == "[]"


def test_benchmarks_need_only_torch_and_transformers():
    assert run(BENCH) == ["[]"]


API = """
import sys
import pipeline.api
print(sorted({"hydra", "wandb", "matplotlib"} & {name.split(".")[0] for name in sys.modules}))
"""


def test_the_editing_api_imports_without_hydra_or_wandb():
    """`pipeline.api` is for Python users: Hydra composes its configuration when `load` is
    called, never on import, and W&B is the stages' alone."""
    assert run(API) == ["[]"]
