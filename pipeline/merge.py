"""Combine the finished shards of a trace, stats or evaluate run into its summary.

    python -m pipeline.merge results/evaluate/smollm2-135m/counterfact-easyedit/rome [DIR ...]
    python -m pipeline.merge DIR --allow-partial    # summarize what is there, marked partial

Each shard job leaves the run's resolved `config.yaml` and `run.json` in the shared results
directory; this reruns that stage's aggregate step on them (the same code as
`aggregate_only=true`), so a merge of any set of shards gives the numbers of one unsharded run.
Unfinished shards stop the merge with a list of what each is missing. Mass and sequential runs
are one job each (their configs refuse shards): merging such a directory writes its summary
again from the files on disk (every mass size with a `mass-<N>.jsonl`).
"""

from __future__ import annotations

import argparse
import importlib
import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from pipeline.app.stage import STAGES, run_stage
from pipeline.core import files


def merge_config(directory: Path, allow_partial: bool = False) -> tuple[str, DictConfig]:
    """The stage and the config its shards ran with, switched to aggregating `directory`."""
    config, meta = directory / "config.yaml", directory / "run.json"
    if not config.exists() or not meta.exists():
        raise SystemExit(f"{directory} is not a results directory (no config.yaml / run.json)")
    name = files.read_json(meta)["stage"]
    cfg = OmegaConf.load(config)
    if "aggregate_only" not in cfg:
        raise SystemExit(f"stage {name!r} has no shards to merge")
    cfg.aggregate_only = True
    cfg.allow_partial = allow_partial  # also for runs saved before the key existed
    cfg.out_dir = str(directory.resolve())
    return name, cfg


def merge(directory: str | Path, allow_partial: bool = False) -> Path:
    name, cfg = merge_config(Path(directory), allow_partial)
    importlib.import_module(f"pipeline.{name}")  # registers the stage
    if name not in STAGES:
        raise SystemExit(f"unknown stage {name!r} in {directory}")
    return run_stage(name, cfg).out_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.merge", description=__doc__.split("\n")[0]
    )
    parser.add_argument("directories", nargs="+", type=Path, help="results directories of runs")
    parser.add_argument(
        "--allow-partial",
        action="store_true",
        help="summarize the finished part of unfinished shards (the summary says what is missing)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(levelname)s] %(message)s")
    for directory in args.directories:
        print(f"results: {merge(directory, args.allow_partial)}", flush=True)


if __name__ == "__main__":
    main()
