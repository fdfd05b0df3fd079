"""Every benchmark in one run (`make bench`): trace, stats, edit and evaluate, each reference or
one-at-a-time path against the fast path in the same process, with the compute floor.

    python scripts/bench.py                      # SmolLM2 on this machine, ~15 min on 2 cores
    python scripts/bench.py --only trace stats   # some of them
    python scripts/bench.py --model gpt2-xl --random --layer 17 --device cuda --dtype bfloat16

Each benchmark runs in its own process (scripts/bench_<name>.py) and leaves JSON; this writes
them together to results/bench/<time>/bench.json, rewrites the table between the `bench:table`
markers in BENCHMARKS.md (machine, command, both paths, ratio, agreement, share of the matmul
rate reached) and logs the table to W&B (offline unless configured).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import benchlib

from pipeline.app import tracking

ROOT = benchlib.ROOT
MARKERS = "<!-- bench:{}:begin -->", "<!-- bench:{}:end -->"


def commands(args: argparse.Namespace) -> dict[str, list[str]]:
    """Per benchmark, its script's arguments at `make bench` sizes."""
    model = ["--model", args.model, "--device", args.device, "--dtype", args.dtype]
    if args.random:
        model.append("--random")
    edit = [*model, "--layer", str(args.layer), "--stats-tokens", str(args.stats_tokens)]
    return {
        "trace": [*model, "--prompts", str(args.prompts), "--reference-prompts", "1"],
        "stats": [*edit],
        "edit": [*edit, "--requests", str(args.cases)],
        "eval": [*edit, "--cases", str(args.cases), "--batch", str(args.cases)],
    }


def row(name: str, result: dict, command: str) -> str:
    """One Markdown table row from a benchmark's JSON."""
    if name == "trace":
        ref = result["reference"].get("hidden", {})
        slow = f"{ref.get('reference_seconds', float('nan')):.1f} s/prompt (hidden)"
        fast = (
            f"{ref.get('fast_seconds', float('nan')):.1f} s/prompt; all kinds "
            f"{result['projected_hours_per_1000_prompts']:.2f} h per 1,000 prompts"
        )
        ratio, agree = ref.get("ratio"), f"{ref.get('max_difference', float('nan')):.1e} abs"
    elif name == "stats":
        slow = f"{result['one_at_a_time_keys_per_second']:.0f} keys/s"
        fast = f"{result['batched_keys_per_second']:.0f} keys/s"
        ratio, agree = result["ratio"], f"{result['max_relative_difference']:.1e} rel"
    elif name == "edit":
        slow = (
            f"{result['original_seconds_per_edit']:.1f} s/edit original; "
            f"{result['one_at_a_time_seconds_per_edit']:.1f} one at a time "
            f"({result['v_ratio']:.2f}x: our v*)"
        )
        fast = (
            f"{result['batched_seconds_per_edit']:.1f} s/edit "
            f"({result['batching_ratio']:.2f}x over one at a time)"
        )
        ratio, agree = result["ratio"], f"{result['max_relative_difference']:.1e} rel"
    else:
        slow = (
            f"{result['original_cases_per_hour']:.0f} cases/h original; "
            f"{result['one_at_a_time_cases_per_hour']:.0f} one at a time "
            f"({result['v_ratio']:.2f}x: our v*)"
        )
        fast = (
            f"{result['batched_cases_per_hour']:.0f} cases/h "
            f"({result['batching_ratio']:.2f}x over one at a time)"
        )
        ratio, agree = result["ratio"], f"{result['max_difference']:.1e} abs"
    floor = result.get("floor", {}).get("fraction")
    cells = [
        name,
        result["model"],
        result["device"],
        slow,
        fast,
        f"{ratio:.2f}x" if ratio else "–",
        agree,
        f"{100 * floor:.0f}%" if floor else "–",
        f"{result['peak_memory_gib']:.1f} GiB",
        f"`{command}`",
    ]
    return "| " + " | ".join(cells) + " |"


def table(results: dict[str, dict], shown: dict[str, str]) -> str:
    machine = next(iter(results.values()))["machine"]
    where = f"{machine['cpu']}, {machine['cores']} cores, torch {machine['torch']}" + (
        f", {machine['gpu']}" if "gpu" in machine else ""
    )
    lines = [
        f"Measured {time.strftime('%Y-%m-%d')} on {where} by `python scripts/bench.py` "
        "(`make bench`); the slow and fast paths of a row ran in the same process.",
        "",
        "| benchmark | model | device | reference / one at a time | fast / batched | ratio | "
        "agreement | matmul rate reached | peak memory | command |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [row(name, result, shown[name]) for name, result in results.items()]
    return "\n".join(lines)


def update_markdown(path: Path, section: str, text: str) -> None:
    """Replace the section's table between its markers (added at the end the first time)."""
    begin, end = (marker.format(section) for marker in MARKERS)
    body = path.read_text()
    block = f"{begin}\n{text}\n{end}"
    if begin in body and end in body:
        body = body[: body.index(begin)] + block + body[body.index(end) + len(end) :]
    else:
        body = body.rstrip() + f"\n\n## `make bench`: {section}\n\n" + block + "\n"
    path.write_text(body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", choices=["trace", "stats", "edit", "eval"])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--layer", type=int, default=6)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--random", action="store_true")
    parser.add_argument("--cases", type=int, default=4, help="edits / cases per benchmark")
    parser.add_argument("--prompts", type=int, default=2, help="traced prompts (1 with reference)")
    parser.add_argument("--section", default="cpu", help="which table of BENCHMARKS.md to rewrite")
    parser.add_argument("--stats-tokens", type=int, default=20000)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "bench")
    parser.add_argument("--markdown", type=Path, default=ROOT / "BENCHMARKS.md")
    parser.add_argument("--no-markdown", action="store_true", help="leave the Markdown file alone")
    args = parser.parse_args()
    out = args.out / time.strftime("%Y-%m-%d_%H-%M-%S")
    results, shown = {}, {}
    for name, extra in commands(args).items():
        if args.only and name not in args.only:
            continue
        script = ROOT / "scripts" / f"bench_{name}.py"
        argv = [sys.executable, str(script), *extra, "--json", str(out / f"{name}.json")]
        shown[name] = "python " + " ".join(
            shlex.quote(str(Path(a).relative_to(ROOT)) if str(a).startswith(str(ROOT)) else a)
            for a in argv[1:-2]
        )
        print(f"== {shown[name]}", flush=True)
        done = subprocess.run(argv, cwd=ROOT, env=os.environ)
        if done.returncode != 0:
            raise SystemExit(f"benchmark {name} failed ({done.returncode})")
        results[name] = json.loads((out / f"{name}.json").read_text())
    (out / "bench.json").write_text(json.dumps(results, indent=1) + "\n")
    text = table(results, shown)
    print("\n" + text)
    if not args.no_markdown:
        update_markdown(args.markdown, args.section, text)
    tracker = tracking.Tracker(
        mode=os.environ.get("ROME_WANDB_MODE", "offline"),
        job_type="bench",
        name=f"bench/{out.name}",
        config={k: str(v) for k, v in vars(args).items()},
        directory=ROOT / "results",
    )
    tracker.table(
        "bench",
        ["benchmark", "model", "device", "ratio", "floor_fraction"],
        [
            [
                n,
                r["model"],
                r["device"],
                r.get("ratio") or r["reference"].get("hidden", {}).get("ratio"),
                r.get("floor", {}).get("fraction"),
            ]
            for n, r in results.items()
        ],
    )
    tracker.finish()
    print(f"results: {out}")


if __name__ == "__main__":
    main()
