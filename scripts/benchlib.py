"""What the editing benchmarks share: model and hyperparameter arguments, and the corpus for C."""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterator
from pathlib import Path

import torch
import yaml

from pipeline.corpus import local_files, read_local
from pipeline.models import LoadedModel, load_model

ROOT = Path(__file__).resolve().parent.parent


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--layer", type=int, default=6)
    parser.add_argument("--templates", default="5x10,10x10", help="length x count, comma separated")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--stats-tokens", type=int, default=50000)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--random", action="store_true", help="random weights of the architecture")
    parser.add_argument("--data", default=os.environ.get("ROME_DATA", str(ROOT / "data")))


def load(args: argparse.Namespace) -> LoadedModel:
    """The model named by --model (conf/model/<name>.yaml), random weights with --random."""
    if args.threads:
        torch.set_num_threads(args.threads)
    spec = yaml.safe_load((ROOT / "conf" / "model" / f"{args.model}.yaml").read_text())
    if args.random:
        spec = {**spec, "source": "random"}
    cache = os.environ.get("ROME_CACHE", str(ROOT / ".cache"))
    return load_model(spec, cache_dir=cache, device=args.device, dtype=args.dtype)


def template_lengths(args: argparse.Namespace) -> tuple[tuple[int, int], ...]:
    return tuple(tuple(int(x) for x in item.split("x")) for item in args.templates.split(","))


def corpus(args: argparse.Namespace) -> Iterator[str]:
    """The local text for C. A C from a few prompts is nearly singular, which makes updates
    (and any comparison of them) hypersensitive to float rounding, so there is no fallback."""
    local = Path(args.data) / "wikipedia"
    if not (local.is_dir() and local_files(local)):
        raise SystemExit(f"no corpus under {local}: set ROME_DATA or --data")
    return read_local(local)
