"""MEMIT: the reference protocol against ours, and how a mass edit grows with the number of edits.

    python scripts/bench_memit.py --requests 8                 # z: reference vs batched (SmolLM2)
    python scripts/bench_memit.py --sizes 1 10 100 1000        # one joint edit of N requests
    python scripts/bench_memit.py --model gpt2-xl --random --layers 13 14 15 16 17 --device cuda

The reference protocol (kmeng01/memit) optimises each request's z alone, every row whole at every
step, and spreads it over the layers with a dense (in, in) solve of λC + K Kᵀ per layer; ours
optimises all of them in one batch, running at each step only what δ changes (`values.py`,
`prefixes.py`), and spreads every request's z in shared passes with λC factored once per layer
(`memit.py`). It also counts each way's work with torch's FLOP counter: their ratio is the speed-up
at equal rates, the most a matmul-bound device can show. Requests are CounterFact records from the
data root (EasyEdit schema), else the bundled sample. C at each layer comes from the local corpus
under $ROME_DATA/wikipedia when there is one.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace

import benchlib
import torch

from pipeline.core import editing
from pipeline.core.editing.memit import Memit, MemitHparams
from pipeline.core.second_moment import second_moment


class ReferenceMemit(Memit):
    """The reference code's spread arithmetic: no factor of λC kept, a dense solve per layer."""

    def c_inverse(self, layer, keys):
        return None


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    benchlib.add_model_arguments(parser)
    parser.set_defaults(templates="10x5")
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 3, 4, 5, 6])
    parser.add_argument("--requests", type=int, default=8, help="compared two ways (0: skip)")
    parser.add_argument("--sizes", type=int, nargs="*", default=[], help="joint edits of N")
    parser.add_argument("--weight", type=float, default=15000.0, help="mom2_update_weight λ")
    benchlib.add_output_arguments(parser)
    return parser.parse_args()


def requests_from(args, n: int) -> list[editing.EditRequest]:
    candidates = [
        benchlib.Path(args.data) / "counterfact_easyedit/counterfact-edit.json",
        benchlib.ROOT / "data/samples/counterfact-edit_sample.json",
    ]
    path = next(p for p in candidates if p.exists())
    records = json.loads(path.read_text())[:n]
    if len(records) < n:
        raise SystemExit(f"{path} has {len(records)} records, fewer than {n}")
    return [
        editing.EditRequest.from_filled(r["prompt"], r["subject"], r["target_new"], id=r["case_id"])
        for r in records
    ]


def main():
    args = parse_args()
    lm = benchlib.load(args)
    texts = list(benchlib.corpus(args))
    start = benchlib.clock(args.device)
    moments = {
        layer: second_moment(lm, layer, texts, max_tokens=args.stats_tokens, progress=False)
        for layer in args.layers
    }
    stats_seconds = benchlib.clock(args.device) - start
    hp = MemitHparams(
        layers=tuple(args.layers),
        context_templates=benchlib.template_lengths(args),
        v_num_grad_steps=args.steps,
        mom2_update_weight=args.weight,
    )
    templates = editing.templates_for(lm, hp)
    threads = torch.get_num_threads()
    print(f"\n{args.model} MEMIT layers {args.layers}, {args.device}, {threads} threads")
    print(
        f"{len(templates)} context templates; C of {len(args.layers)} layers in {stats_seconds:.0f} s"
    )
    result: dict = {"benchmark": "memit", "model": lm.name, "device": str(lm.device)}

    if args.requests:
        requests = requests_from(args, args.requests)
        reference = ReferenceMemit(
            lm, replace(hp, v_whole_rows=True), second_moments=moments, context_templates=templates
        )
        ours = Memit(lm, hp, second_moments=moments, context_templates=templates)
        start = benchlib.clock(args.device)
        original = [reference.independent(lm, [(i, r)])[0] for i, r in enumerate(requests)]
        original_seconds = benchlib.clock(args.device) - start
        start = benchlib.clock(args.device)
        alone = [ours.independent(lm, [(i, r)])[0] for i, r in enumerate(requests)]
        alone_seconds = benchlib.clock(args.device) - start
        start = benchlib.clock(args.device)
        together = ours.independent(lm, list(enumerate(requests)))
        batched_seconds = benchlib.clock(args.device) - start
        difference = max(
            float((a.matrix() - b.matrix()).abs().max() / b.matrix().abs().max())
            for ref in (original, alone)
            for x, y in zip(ref, together, strict=True)
            if x.ok and y.ok
            for a, b in zip(x.update, y.update, strict=True)
        )
        print(f"steps per request: {[r.steps for r in together]}, ok: {[r.ok for r in together]}")
        n = len(requests)
        ratios = benchlib.print_modes("edit", n, original_seconds, alone_seconds, batched_seconds)
        print("  (v* here: z reusing the prefix, and the spread with λC factored once per layer)")
        print(f"max relative difference of the updates: {difference:.1e}")
        # The work each way does, forward and backward: its ratio bounds what any speed-up can
        # reach where the device runs both at the same rate (matmul-bound, as a CPU is). Counted
        # in runs of their own, since the counter's overhead would distort the timed ones.
        _, original_flops = benchlib.counted_flops(
            lambda: [reference.independent(lm, [(i, r)]) for i, r in enumerate(requests)]
        )
        _, batched_flops = benchlib.counted_flops(
            lambda: ours.independent(lm, list(enumerate(requests)))
        )
        rate = benchlib.matmul_rate(str(lm.device), lm.model.dtype)
        print(
            f"work: original {original_flops / 1e9:.0f} GFLOP, batched {batched_flops / 1e9:.0f}"
            f" GFLOP, ratio {original_flops / batched_flops:.2f}x (the speed-up at equal rates)"
        )
        for name, flops, seconds in (
            ("original", original_flops, original_seconds),
            ("batched", batched_flops, batched_seconds),
        ):
            print(f"  {name}: {benchlib.floor_line(flops, rate, seconds)}")
        result |= {
            "requests": n,
            "original_seconds_per_edit": original_seconds / n,
            "one_at_a_time_seconds_per_edit": alone_seconds / n,
            "batched_seconds_per_edit": batched_seconds / n,
            **ratios,
            "max_relative_difference": difference,
            "original_flops": original_flops,
            "batched_flops": batched_flops,
            "work_ratio": original_flops / batched_flops,
            "matmul_flops_per_second": rate,
        }

    if args.sizes:
        editor = Memit(lm, hp, second_moments=moments, context_templates=templates)
        pool = requests_from(args, max(args.sizes))
        growth = []
        print("\nedits   seconds   s/edit   peak memory (GiB, process so far)")
        for n in sorted(args.sizes):
            start = benchlib.clock(args.device)
            edit = editor.joint(lm, list(enumerate(pool[:n])))
            seconds = benchlib.clock(args.device) - start
            peak = benchlib.peak_memory_gib(args.device)
            ok = sum(r.ok for r in edit.results)
            print(f"{n:5d} {seconds:9.1f} {seconds / n:8.2f}   {peak:.2f}   ({ok} ok)")
            growth.append({"edits": n, "seconds": seconds, "peak_gib": peak, "ok": ok})
        result["mass"] = growth
    benchlib.write_json(args, result)


if __name__ == "__main__":
    main()
