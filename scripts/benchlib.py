"""What the benchmarks share: model arguments, the corpus for C, timing, FLOPs and memory.

The benchmarks need only torch and transformers (and what those bring: numpy, pyyaml, tqdm,
safetensors, tokenizers), so they run on a bare GPU machine from a checkout, uninstalled.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the pipeline, from a checkout that was never installed

from pipeline.core.models import LoadedModel, load_model, peak_memory_gib  # noqa: E402, F401
from pipeline.data.corpus import local_files, read_local  # noqa: E402


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
    parser.add_argument("--data", default=default_data())


def default_data() -> str:
    return os.environ.get("ROME_DATA", str(ROOT / "data"))


def load(args: argparse.Namespace) -> LoadedModel:
    """The model named by --model (conf/model/<name>.yaml or a path), random with --random."""
    if args.threads:
        torch.set_num_threads(args.threads)
    path = (
        Path(args.model)
        if args.model.endswith(".yaml")
        else ROOT / "conf/model" / f"{args.model}.yaml"
    )
    spec = yaml.safe_load(path.read_text())
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


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", type=Path, help="also write the results here (make bench)")


def write_json(args: argparse.Namespace, result: dict) -> None:
    """The results with the machine and this process's peak memory (the stage's, since each
    benchmark runs in its own process)."""
    if getattr(args, "json", None):
        args.json.parent.mkdir(parents=True, exist_ok=True)
        body = {
            **result,
            "peak_memory_gib": peak_memory_gib(result.get("device", "cpu")),
            "machine": machine(),
        }
        args.json.write_text(json.dumps(body, indent=1) + "\n")


def machine() -> dict:
    """What the numbers were measured on."""
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def synchronize(device: str | torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def matmul_rate(
    device: str = "cpu", dtype: torch.dtype = torch.float32, n: int = 1024, seconds: float = 2.0
) -> float:
    """FLOP/s of n x n matrix products here: the rate the compute floor is measured against."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    synchronize(device)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    synchronize(device)
    return 2 * n**3 * count / (time.perf_counter() - start)


def counted_flops(fn):
    """(fn(), the floating-point operations torch counted while it ran)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        value = fn()
    return value, counter.get_total_flops()


def floor_line(flops: float, rate: float, measured: float) -> str:
    floor = flops / rate
    return (
        f"{flops / 1e9:.1f} GFLOP counted; at {rate / 1e9:.1f} GFLOP/s (matmul here) the floor is "
        f"{floor:.2f} s; measured {measured:.2f} s: {100 * floor / measured:.0f}% of the matmul rate"
    )


def clock(device: str | torch.device = "cpu") -> float:
    """perf_counter after the device's queued work is done (GPU kernels run asynchronously)."""
    synchronize(device)
    return time.perf_counter()


def print_modes(item: str, n: int, original: float, alone: float, batched: float) -> dict:
    """Print the seconds of the three ways an edit benchmark runs n items (`item`: edit, case)
    and the ratios between them; return the ratios for the JSON.

    original: the reference code's way, one item at a time; one at a time: this pipeline's v*;
    batched: this pipeline, many items together."""
    print(f"\n{'mode':<14}{item + 's':>8}{'total s':>10}{'s / ' + item:>10}{item + 's / h':>10}")
    for name, seconds in (("original", original), ("one at a time", alone), ("batched", batched)):
        print(f"{name:<14}{n:>8}{seconds:>10.1f}{seconds / n:>10.2f}{3600 * n / seconds:>10.0f}")
    print(f"speed-up (original / batched): {original / batched:.2f}x")
    print(f"  of which v* (only what δ changes runs at each step): {original / alone:.2f}x")
    print(f"  of which batching: {alone / batched:.2f}x")
    return {
        "ratio": original / batched,
        "v_ratio": original / alone,
        "batching_ratio": alone / batched,
    }
