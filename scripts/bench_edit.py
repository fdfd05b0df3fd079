"""Seconds per ROME edit, one request at a time vs batched, and key-statistics throughput.

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
import os
import time
from pathlib import Path

import torch
import yaml

from pipeline import rome
from pipeline.corpus import local_files, read_local
from pipeline.models import load_model
from pipeline.second_moment import second_moment

ROOT = Path(__file__).resolve().parent.parent


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--layer", type=int, default=6)
    parser.add_argument("--editor", default="rome", choices=["rome", "r-rome"])
    parser.add_argument("--requests", type=int, default=4)
    parser.add_argument("--templates", default="5x5,10x5", help="length x count, comma separated")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--stats-tokens", type=int, default=20000)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--random", action="store_true", help="random weights of the architecture")
    parser.add_argument("--data", default=os.environ.get("ROME_DATA", str(ROOT / "data")))
    return parser.parse_args()


def main():
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    spec = yaml.safe_load((ROOT / "conf" / "model" / f"{args.model}.yaml").read_text())
    if args.random:
        spec = {**spec, "source": "random"}
    cache = os.environ.get("ROME_CACHE", str(ROOT / ".cache"))
    lm = load_model(spec, cache_dir=cache, device=args.device, dtype=args.dtype)
    lengths = tuple(tuple(int(x) for x in item.split("x")) for item in args.templates.split(","))
    hp = rome.RomeHparams.for_editor(
        args.editor, layer=args.layer, context_templates=lengths, v_num_grad_steps=args.steps
    )

    local = Path(args.data) / "wikipedia"
    if local.is_dir() and local_files(local):
        texts = read_local(local)
    else:
        texts = [
            r["prompt"]
            for r in json.loads((ROOT / "data/samples/known_1000_sample.json").read_text())
        ]
    start = time.perf_counter()
    stat = second_moment(lm, args.layer, texts, max_tokens=args.stats_tokens, progress=False)
    stats_seconds = time.perf_counter() - start

    start = time.perf_counter()
    templates = rome.templates_for(lm, hp)
    template_seconds = time.perf_counter() - start

    records = json.loads((ROOT / "data/samples/counterfact-edit_sample.json").read_text())
    requests = [
        rome.EditRequest.from_filled(r["prompt"], r["subject"], r["target_new"], id=r["case_id"])
        for r in records[: args.requests]
    ]
    common = dict(second_moment=stat, context_templates=templates)

    start = time.perf_counter()
    alone = [rome.compute_updates(lm, [r], hp, **common)[0] for r in requests]
    alone_seconds = time.perf_counter() - start
    start = time.perf_counter()
    together = rome.compute_updates(lm, requests, hp, batch_size=len(requests), **common)
    batched_seconds = time.perf_counter() - start

    ok = [(a, b) for a, b in zip(alone, together, strict=True) if a.ok and b.ok]
    difference = max(
        float((a.update.matrix() - b.update.matrix()).abs().max() / b.update.matrix().abs().max())
        for a, b in ok
    )
    n = len(requests)
    threads = torch.get_num_threads()
    print(f"\n{args.model} layer {args.layer} {args.editor}, {args.device}, {threads} threads")
    print(f"{len(templates)} context templates (generated in {template_seconds:.1f} s)")
    print(f"steps per request: {[r.steps for r in together]}, ok: {[r.ok for r in together]}")
    print(f"\n{'mode':<14}{'requests':>9}{'total s':>10}{'s / edit':>10}")
    print(f"{'one at a time':<14}{n:>9}{alone_seconds:>10.1f}{alone_seconds / n:>10.2f}")
    print(f"{'batched':<14}{n:>9}{batched_seconds:>10.1f}{batched_seconds / n:>10.2f}")
    print(f"speed-up (one at a time / batched): {alone_seconds / batched_seconds:.2f}x")
    print(f"max relative difference of the updates: {difference:.1e}")
    print(
        f"statistics: {stat.count} tokens to layer {args.layer} in {stats_seconds:.1f} s "
        f"= {stat.count / stats_seconds:.0f} tokens/s"
    )


if __name__ == "__main__":
    main()
