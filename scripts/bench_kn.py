"""KN's attribution: whole prompts per scaled row (the reference) against the last token only.

    python scripts/bench_kn.py --requests 4                      # SmolLM2 on the CPU
    python scripts/bench_kn.py --model gpt2-xl --random --device cuda

Integrated gradients replace one MLP activation at the prompt's last token, which leaves every
earlier position unchanged; `reuse_prefix` runs each of the (layer, α) rows on that token alone,
over the clean pass's keys and values. Both ways score the same neurons of the same requests
(CounterFact records from data/samples) in one run; the ratio and the largest difference of the
scores are printed.
"""

from __future__ import annotations

import argparse
import json

import benchlib
import torch

from pipeline.core.editing.kn import KnHparams, neuron_scores
from pipeline.core.tokens import encode, target_ids


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    benchlib.add_model_arguments(parser)
    parser.add_argument("--requests", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=160, help="(layer, α) rows per pass")
    benchlib.add_output_arguments(parser)
    return parser.parse_args()


def main():
    args = parse_args()
    lm = benchlib.load(args)
    records = json.loads((benchlib.ROOT / "data/samples/counterfact-edit_sample.json").read_text())
    prompts = [
        (
            encode(lm.tokenizer, r["prompt"]),
            target_ids(lm.tokenizer, r["ground_truth"], r["prompt"]),
        )
        for r in records[: args.requests]
    ]
    seconds, scores = {}, {}
    for reuse in (False, True):
        hp = KnHparams(batch_size=args.batch_size, reuse_prefix=reuse)
        neuron_scores(lm, *prompts[0], hp)  # warm-up
        start = benchlib.clock(args.device)
        scores[reuse] = [neuron_scores(lm, prompt, answer[:1], hp)[0] for prompt, answer in prompts]
        seconds[reuse] = (benchlib.clock(args.device) - start) / len(prompts)
    difference = max(
        float((a - b).abs().max() / b.abs().max())
        for a, b in zip(scores[True], scores[False], strict=True)
    )
    tokens = sum(len(p) for p, _ in prompts) / len(prompts)
    threads = torch.get_num_threads()
    print(f"\n{args.model} KN attribution, {args.device}, {threads} threads")
    print(f"{len(prompts)} requests, {tokens:.1f} prompt tokens on average")
    print(f"whole prompts (reference): {seconds[False]:.2f} s per request")
    print(f"last token on the prefix:  {seconds[True]:.2f} s per request")
    print(f"speed-up: {seconds[False] / seconds[True]:.2f}x")
    print(f"max relative difference of the scores: {difference:.1e}")
    benchlib.write_json(
        args,
        {
            "benchmark": "kn",
            "model": lm.name,
            "device": str(lm.device),
            "requests": len(prompts),
            "whole_prompt_seconds_per_request": seconds[False],
            "prefix_seconds_per_request": seconds[True],
            "speedup": seconds[False] / seconds[True],
            "max_relative_difference": difference,
        },
    )


if __name__ == "__main__":
    main()
