"""Time the fast causal-tracing engine against the hook-based reference on the same noise.

    python scripts/bench_trace.py                      # SmolLM2, 3 prompts, reference on 1 prompt
    python scripts/bench_trace.py --prompts 10 --reference-kinds hidden mlp attn --threads 1

The reference costs one forward pass per (token, layer): minutes per prompt and kind on SmolLM2
on 2 CPU cores, so by default it runs on the first prompt and the `hidden` kind only; ratios
compare the engines on exactly those (prompt, kind) pairs. A fast time per kind includes the
clean and corrupted runs, as a standalone `trace(kind=...)` call would.

Wall-clock time suffers when other jobs share the CPU; process CPU time much less so (with one
thread, where no time goes to threads waiting on each other), so both are printed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import benchlib
import torch

from pipeline.core.patching import KINDS, FastTracer, Readout, embedding_std, make_noise, reference
from pipeline.core.patching.common import hidden_size
from pipeline.core.tokens import encode, subject_span

ROOT = Path(__file__).resolve().parents[1]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="conf/model/<name>.yaml or a path")
    parser.add_argument("--random", action="store_true", help="random weights of the architecture")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--data", default=str(ROOT / "data/samples/known_1000_sample.json"))
    parser.add_argument("--prompts", type=int, default=3, help="the first N records of --data")
    parser.add_argument("--indices", type=int, nargs="+", help="these records instead")
    parser.add_argument("--reference-prompts", type=int, default=1)
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    parser.add_argument("--reference-kinds", nargs="+", default=["hidden"], choices=KINDS)
    parser.add_argument("--samples", type=int, default=10, help="noisy copies S")
    parser.add_argument("--window", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-floor", action="store_true", help="skip counting FLOPs")
    benchlib.add_output_arguments(parser)
    return parser.parse_args()


@dataclass
class Seconds:
    wall: float = 0.0
    cpu: float = 0.0

    def __add__(self, other: Seconds) -> Seconds:
        return Seconds(self.wall + other.wall, self.cpu + other.cpu)

    def __str__(self) -> str:
        return f"{self.wall:.1f}s (cpu {self.cpu:.1f}s)"


def timed(fn):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    wall, cpu = benchlib.clock(device), time.process_time()
    value = fn()
    return value, Seconds(benchlib.clock(device) - wall, time.process_time() - cpu)


def mean(values: list[Seconds]) -> Seconds:
    return Seconds(statistics.mean(v.wall for v in values), statistics.mean(v.cpu for v in values))


@torch.no_grad()
def main() -> None:
    args = parse_args()
    lm = benchlib.load(args)
    records = json.loads(Path(args.data).read_text())
    scale = 3 * embedding_std(lm, [(r["prompt"], r["subject"]) for r in records[:100]])
    print(
        f"model {lm.name}: {lm.n_layers} layers, {lm.device}, {lm.dtype}, "
        f"{torch.get_num_threads()} threads; S={args.samples}, window={args.window}, "
        f"noise scale {scale:.4f}"
    )

    first_prompt = None  # (readout, span, noise) for the FLOP count
    fast_times: dict[str, list[Seconds]] = {kind: [] for kind in args.kinds}
    fast_all: list[Seconds] = []
    compared: dict[str, list[tuple[Seconds, Seconds, float]]] = {}  # kind -> (fast, ref, diff)
    chosen = args.indices if args.indices else range(args.prompts)
    for number, index in enumerate(chosen):
        record = records[index]
        ids = encode(lm.tokenizer, record["prompt"])
        span = subject_span(lm.tokenizer, record["prompt"], record["subject"])
        answer = [int(lm.model(torch.tensor([ids], device=lm.device)).logits[0, -1].argmax())]
        generator = torch.Generator().manual_seed(args.seed)
        noise = make_noise(generator, args.samples, span[1] - span[0], hidden_size(lm), scale)
        readout = Readout.build(ids, answer)

        first_prompt = first_prompt or (readout, span, noise)
        tracer, runs = timed(lambda: FastTracer(lm, readout, span, noise, args.batch_size))  # noqa: B023
        grids, per_kind = {}, {}
        for kind in dict.fromkeys(args.kinds + args.reference_kinds):
            grids[kind], per_kind[kind] = timed(lambda: tracer.grid(kind, args.window))  # noqa: B023
        total = runs
        for kind in args.kinds:
            fast_times[kind].append(runs + per_kind[kind])
            total = total + per_kind[kind]
        fast_all.append(total)
        print(
            f"[{index}] {record['prompt']!r} -> {lm.tokenizer.decode(answer)!r}: {len(ids)} "
            f"tokens, subject at {span}; fast, all kinds: {total}; runs {runs}, "
            + ", ".join(f"{kind} {per_kind[kind]}" for kind in args.kinds)
        )
        if number >= args.reference_prompts:
            continue
        for kind in args.reference_kinds:
            (_, _, ref_grid), ref = timed(
                lambda: reference.trace_grid(lm, readout, span, noise, kind, args.window)  # noqa: B023
            )
            fast = runs + per_kind[kind]
            difference = (ref_grid - grids[kind]).abs().max().item()
            compared.setdefault(kind, []).append((fast, ref, difference))
            print(
                f"    {kind}: reference {ref} vs fast {fast}: {ref.wall / fast.wall:.1f}x "
                f"(cpu {ref.cpu / fast.cpu:.1f}x); max |difference| {difference:.1e}"
            )

    print("\nfast engine, per prompt (mean; the clean/corrupted runs included):")
    for kind, times in fast_times.items():
        seconds = mean(times)
        print(f"  {kind:6s} {seconds}  {1 / seconds.wall:.3f} prompts/s")
    seconds = mean(fast_all)
    print(f"  {'all':6s} {seconds}  {1 / seconds.wall:.3f} prompts/s")
    if compared:
        print("reference vs fast, same prompts and noise:")
    result = {
        "benchmark": "trace",
        "model": lm.name,
        "device": str(lm.device),
        "samples": args.samples,
        "prompts": len(fast_all),
        "fast_seconds_per_prompt": {k: mean(v).wall for k, v in fast_times.items()},
        "fast_seconds_per_prompt_all_kinds": mean(fast_all).wall,
        "projected_hours_per_1000_prompts": 1000 * mean(fast_all).wall / 3600,
        "reference": {},
    }
    for kind, rows in compared.items():
        fast, ref = mean([r[0] for r in rows]), mean([r[1] for r in rows])
        print(
            f"  {kind:6s} reference {ref} = {1 / ref.wall:.4f} prompts/s; fast {fast}: "
            f"{ref.wall / fast.wall:.1f}x wall, {ref.cpu / fast.cpu:.1f}x cpu; "
            f"max |difference| {max(r[2] for r in rows):.1e} over {len(rows)} prompt(s)"
        )
        result["reference"][kind] = {
            "reference_seconds": ref.wall,
            "fast_seconds": fast.wall,
            "ratio": ref.wall / fast.wall,
            "max_difference": max(r[2] for r in rows),
            "prompts": len(rows),
        }
    if not args.no_floor:
        readout, span, noise = first_prompt

        def all_kinds():
            tracer = FastTracer(lm, readout, span, noise, args.batch_size)
            for kind in args.kinds:
                tracer.grid(kind, args.window)

        _, flops = benchlib.counted_flops(all_kinds)
        rate = benchlib.matmul_rate(str(lm.device), lm.model.dtype)
        measured = fast_all[0].wall
        print(
            "compute floor, first prompt, all kinds: " + benchlib.floor_line(flops, rate, measured)
        )
        result["floor"] = {
            "flops": flops,
            "matmul_flops_per_second": rate,
            "floor_seconds": flops / rate,
            "measured_seconds": measured,
            "fraction": flops / rate / measured,
        }
    benchlib.write_json(args, result)


if __name__ == "__main__":
    main()
