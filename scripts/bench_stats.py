"""Key-statistics throughput: one text per forward pass vs batched, on the same corpus budget.

    python scripts/bench_stats.py --stats-tokens 50000                 # SmolLM2 on the CPU
    python scripts/bench_stats.py --stats-tokens 20000 --layers 2 3 4 5 6   # and MEMIT's layers
    python scripts/bench_stats.py --model gpt2-xl --random --layer 17 --device cuda --dtype bfloat16

Both accumulate C = E[k kᵀ] at the editor's layer over the same first texts of the local corpus
($ROME_DATA/wikipedia) up to --stats-tokens keys; the two statistics are compared. With --layers,
also each of those layers in its own pass against all of them in one pass (bitwise compared).
"""

from __future__ import annotations

import argparse
import time

import benchlib
import torch

from pipeline.core.second_moment import second_moment, second_moments


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    benchlib.add_model_arguments(parser)
    parser.add_argument("--batch", type=int, default=16, help="texts per forward pass")
    parser.add_argument("--layers", type=int, nargs="*", default=[], help="one pass vs several")
    benchlib.add_output_arguments(parser)
    return parser.parse_args()


def main():
    args = parse_args()
    lm = benchlib.load(args)
    rows = {}
    for name, batch in (("one text at a time", 1), ("batched", args.batch)):
        benchlib.synchronize(args.device)
        start = time.perf_counter()
        stat = second_moment(
            lm,
            args.layer,
            benchlib.corpus(args),
            batch_size=batch,
            max_tokens=args.stats_tokens,
            progress=False,
        )
        benchlib.synchronize(args.device)
        rows[name] = (stat, time.perf_counter() - start)
    (single, single_s), (batched, batched_s) = rows.values()
    difference = float((single.sum - batched.sum).abs().max() / batched.sum.abs().max())
    print(
        f"\n{lm.name} layer {args.layer}, {lm.device}, {lm.dtype}, {torch.get_num_threads()} threads"
    )
    print(f"\n{'mode':<20}{'keys':>9}{'seconds':>9}{'keys / s':>10}")
    for name, (stat, seconds) in rows.items():
        print(f"{name:<20}{stat.count:>9}{seconds:>9.1f}{stat.count / seconds:>10.0f}")
    print(f"speed-up (batched over one at a time): {single_s / batched_s:.2f}x")
    print(
        f"keys counted: {single.count} vs {batched.count}; max relative difference {difference:.1e}"
    )
    result = {}
    if args.layers:
        budget = dict(batch_size=args.batch, max_tokens=args.stats_tokens, progress=False)
        start = benchlib.clock(args.device)
        alone = {
            layer: second_moment(lm, layer, benchlib.corpus(args), **budget)
            for layer in args.layers
        }
        alone_s = benchlib.clock(args.device) - start
        start = benchlib.clock(args.device)
        together = second_moments(lm, args.layers, benchlib.corpus(args), **budget)
        together_s = benchlib.clock(args.device) - start
        same = all(torch.equal(alone[x].sum, together[x % lm.n_layers].sum) for x in args.layers)
        print(
            f"\nlayers {args.layers}: one pass each {alone_s:.1f} s, all in one pass "
            f"{together_s:.1f} s: {alone_s / together_s:.2f}x; bitwise equal: {same}"
        )
        result = {
            "layers": args.layers,
            "layers_alone_seconds": alone_s,
            "layers_together_seconds": together_s,
            "layers_bitwise_equal": same,
        }
    benchlib.write_json(
        args,
        {
            **result,
            "benchmark": "stats",
            "model": lm.name,
            "device": str(lm.device),
            "keys": batched.count,
            "one_at_a_time_keys_per_second": single.count / single_s,
            "batched_keys_per_second": batched.count / batched_s,
            "ratio": single_s / batched_s,
            "max_relative_difference": difference,
        },
    )


if __name__ == "__main__":
    main()
