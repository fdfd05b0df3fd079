"""Seconds per ROME edit: the reference v* one at a time, ours one at a time, ours batched.

    python scripts/bench_edit.py --requests 8                      # SmolLM2 on the CPU
    python scripts/bench_edit.py --model gpt2-xl --random --layer 17 --device cuda --dtype bfloat16

Requests are CounterFact records from data/samples (EasyEdit schema: the prompt has the subject
written in). The statistics read the local corpus under $ROME_DATA/wikipedia when there is one,
else the sample prompts. `--random` builds the model's architecture with random weights (GPU
timing without the weights).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace

import benchlib
import torch

from pipeline.core import editing
from pipeline.core.editing import rome
from pipeline.core.second_moment import second_moment


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    benchlib.add_model_arguments(parser)
    parser.add_argument("--editor", default="rome", choices=["rome", "r-rome"])
    parser.add_argument("--requests", type=int, default=8)
    benchlib.add_output_arguments(parser)
    return parser.parse_args()


def main():
    args = parse_args()
    lm = benchlib.load(args)
    hp = rome.RomeHparams.for_editor(
        args.editor,
        layer=args.layer,
        context_templates=benchlib.template_lengths(args),
        v_num_grad_steps=args.steps,
    )
    texts = benchlib.corpus(args)
    start = benchlib.clock(args.device)
    stat = second_moment(lm, args.layer, texts, max_tokens=args.stats_tokens, progress=False)
    stats_seconds = benchlib.clock(args.device) - start

    start = benchlib.clock(args.device)
    templates = editing.templates_for(lm, hp)
    template_seconds = benchlib.clock(args.device) - start

    records = json.loads((benchlib.ROOT / "data/samples/counterfact-edit_sample.json").read_text())
    requests = [
        editing.EditRequest.from_filled(r["prompt"], r["subject"], r["target_new"], id=r["case_id"])
        for r in records[: args.requests]
    ]
    common = dict(second_moment=stat, context_templates=templates)

    def one_at_a_time(hparams):
        start = benchlib.clock(args.device)
        results = [rome.compute_updates(lm, [r], hparams, **common)[0] for r in requests]
        return results, benchlib.clock(args.device) - start

    # The reference code's v*: whole rows at every step; then the pipeline's, one at a time.
    original, original_seconds = one_at_a_time(replace(hp, v_whole_rows=True))
    alone, alone_seconds = one_at_a_time(hp)
    start = benchlib.clock(args.device)
    together = rome.compute_updates(lm, requests, hp, batch_size=len(requests), **common)
    batched_seconds = benchlib.clock(args.device) - start

    ok = [
        (a, b)
        for reference in (original, alone)
        for a, b in zip(reference, together, strict=True)
        if a.ok and b.ok
    ]
    difference = max(
        float((a.update.matrix() - b.update.matrix()).abs().max() / b.update.matrix().abs().max())
        for a, b in ok
    )
    n = len(requests)
    threads = torch.get_num_threads()
    print(f"\n{args.model} layer {args.layer} {args.editor}, {args.device}, {threads} threads")
    print(f"{len(templates)} context templates (generated in {template_seconds:.1f} s)")
    print(f"steps per request: {[r.steps for r in together]}, ok: {[r.ok for r in together]}")
    ratios = benchlib.print_modes("edit", n, original_seconds, alone_seconds, batched_seconds)
    print(f"max relative difference of the updates: {difference:.1e}")
    print(
        f"statistics: {stat.count} tokens to layer {args.layer} in {stats_seconds:.1f} s "
        f"= {stat.count / stats_seconds:.0f} tokens/s"
    )
    benchlib.write_json(
        args,
        {
            "benchmark": "edit",
            "model": lm.name,
            "device": str(lm.device),
            "requests": n,
            "original_seconds_per_edit": original_seconds / n,
            "one_at_a_time_seconds_per_edit": alone_seconds / n,
            "batched_seconds_per_edit": batched_seconds / n,
            **ratios,
            "max_relative_difference": difference,
        },
    )


if __name__ == "__main__":
    main()
