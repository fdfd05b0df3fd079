"""Cases per hour: the original protocol (edit, score, restore, one case at a time) vs batched.

    python scripts/bench_eval.py --cases 8                # SmolLM2 on the CPU
    python scripts/bench_eval.py --model gpt2-xl --random --layer 17 --device cuda --dtype bfloat16

Original: for each case, compute its update alone as the reference code does (the whole
(context + prompt) rows at every v* step), write it into the weights, score the case's prompts,
restore the weights and score them again unedited (as ROME's evaluation does).
One at a time: the same, with this pipeline's v* (the tokens before the subject run once).
Batched: the pipeline's evaluation, `--batch` cases at a time: updates computed together, every
case scored under its own update through hooks, unedited scores once.
All three use the same statistics and templates; their per-case metrics are compared. The
headline ratio is batched over original; batched over one at a time is what batching alone gives.
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import benchlib
import torch

from metrics.counterfact import case_metrics
from pipeline.core import editing
from pipeline.core.editing import rome
from pipeline.core.scoring import score_cases
from pipeline.core.second_moment import second_moment
from pipeline.data.records import load_counterfact


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    benchlib.add_model_arguments(parser)
    parser.add_argument("--cases", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8, help="cases per batch")
    parser.add_argument("--no-floor", action="store_true", help="skip counting FLOPs")
    benchlib.add_output_arguments(parser)
    return parser.parse_args()


def requests_of(cases):
    return [editing.EditRequest(c.template, c.subject, c.target_new) for c in cases]


def main():
    args = parse_args()
    lm = benchlib.load(args)
    lengths = benchlib.template_lengths(args)
    hp = rome.RomeHparams(layer=args.layer, context_templates=lengths, v_num_grad_steps=args.steps)
    cases = load_counterfact(
        benchlib.ROOT / "data/samples/counterfact-edit_sample.json", limit=args.cases
    ).records
    stat = second_moment(lm, args.layer, benchlib.corpus(args), max_tokens=args.stats_tokens)
    templates = editing.templates_for(lm, hp)
    common = dict(second_moment=stat, context_templates=templates)

    def one_at_a_time(hparams):
        start = benchlib.clock(args.device)
        metrics = []
        for case in cases:
            (result,) = rome.compute_updates(lm, requests_of([case]), hparams, **common)
            with editing.edited(lm, [result.update] if result.ok else []):
                (post,) = score_cases(lm, [case])
            (pre,) = score_cases(lm, [case])
            metrics.append((case_metrics(pre), case_metrics(post)))
        return metrics, benchlib.clock(args.device) - start

    original, original_seconds = one_at_a_time(replace(hp, v_whole_rows=True))
    alone, alone_seconds = one_at_a_time(hp)

    def evaluate_batch(batch):
        results = rome.compute_updates(lm, requests_of(batch), hp, batch_size=len(batch), **common)
        pre = score_cases(lm, batch)
        post = score_cases(lm, batch, [r.update if r.ok else None for r in results])
        return [(case_metrics(a), case_metrics(b)) for a, b in zip(pre, post, strict=True)]

    start = benchlib.clock(args.device)
    together, batch_seconds = [], []
    for first in range(0, len(cases), args.batch):
        batch_start = benchlib.clock(args.device)
        together += evaluate_batch(cases[first : first + args.batch])
        batch_seconds.append(benchlib.clock(args.device) - batch_start)
    batched_seconds = benchlib.clock(args.device) - start

    differences = [
        (abs(a[phase][k] - b[phase][k]), case.id, ("pre", "post")[phase], k)
        for reference in (original, alone)
        for case, a, b in zip(cases, reference, together, strict=True)
        for phase in (0, 1)
        for k in a[phase]
    ]
    difference, case_id, phase, metric = max(differences)
    n = len(cases)
    print(
        f"\n{lm.name} layer {args.layer}, {lm.device}, {lm.dtype}, {torch.get_num_threads()} threads"
    )
    print(
        f"{len(templates)} context templates, up to {args.steps} steps, {args.batch} cases per batch"
    )
    ratios = benchlib.print_modes("case", n, original_seconds, alone_seconds, batched_seconds)
    print(
        f"max difference of the per-case metrics: {difference:.1e} "
        f"(case {case_id}, {phase} {metric})"
    )
    result = {
        "benchmark": "evaluate",
        "model": lm.name,
        "device": str(lm.device),
        "cases": n,
        "batch": args.batch,
        "original_cases_per_hour": 3600 * n / original_seconds,
        "one_at_a_time_cases_per_hour": 3600 * n / alone_seconds,
        "batched_cases_per_hour": 3600 * n / batched_seconds,
        **ratios,
        "max_difference": difference,
    }
    if not args.no_floor:
        _, flops = benchlib.counted_flops(lambda: evaluate_batch(cases[: args.batch]))
        rate = benchlib.matmul_rate(str(lm.device), lm.model.dtype)
        print("compute floor, first batch: " + benchlib.floor_line(flops, rate, batch_seconds[0]))
        result["floor"] = {
            "flops": flops,
            "matmul_flops_per_second": rate,
            "floor_seconds": flops / rate,
            "measured_seconds": batch_seconds[0],
            "fraction": flops / rate / batch_seconds[0],
        }
    benchlib.write_json(args, result)


if __name__ == "__main__":
    main()
