"""Cases per hour: the original protocol (edit, score, restore, one case at a time) vs batched.

    python scripts/bench_eval.py --cases 8                # SmolLM2 on the CPU
    python scripts/bench_eval.py --model gpt2-xl --random --layer 17 --device cuda --dtype bfloat16

One at a time: for each case, compute its update alone, write it into the weights, score the
case's prompts, restore the weights and score them again unedited (as ROME's evaluation does).
Batched: the same cases `--batch` at a time: updates computed together, every case scored under
its own update through hooks, unedited scores once. Both use the same statistics and templates;
the per-case metrics of the two are compared.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
import yaml

from metrics.counterfact import case_metrics
from pipeline import rome
from pipeline.corpus import local_files, read_local
from pipeline.data import load_counterfact
from pipeline.evaluation import score_cases
from pipeline.models import load_model
from pipeline.second_moment import second_moment

ROOT = Path(__file__).resolve().parent.parent


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--layer", type=int, default=6)
    parser.add_argument("--cases", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8, help="cases per batch")
    parser.add_argument("--templates", default="5x10,10x10", help="length x count, comma separated")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--random", action="store_true", help="random weights of the architecture")
    parser.add_argument("--stats-tokens", type=int, default=50000)
    parser.add_argument("--data", default=os.environ.get("ROME_DATA", str(ROOT / "data")))
    return parser.parse_args()


def requests_of(cases):
    return [rome.EditRequest(c.template, c.subject, c.target_new) for c in cases]


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
    hp = rome.RomeHparams(layer=args.layer, context_templates=lengths, v_num_grad_steps=args.steps)
    cases = load_counterfact(
        ROOT / "data/samples/counterfact-edit_sample.json", limit=args.cases
    ).records
    # C from real text: a C from a few prompts is nearly singular and makes updates (and the
    # comparison below) hypersensitive to float rounding.
    local = Path(args.data) / "wikipedia"
    if not (local.is_dir() and local_files(local)):
        raise SystemExit(f"no corpus under {local}: set ROME_DATA or --data")
    stat = second_moment(lm, args.layer, read_local(local), max_tokens=args.stats_tokens)
    templates = rome.templates_for(lm, hp)
    common = dict(second_moment=stat, context_templates=templates)

    start = time.perf_counter()
    alone = []
    for case in cases:
        (result,) = rome.compute_updates(lm, requests_of([case]), hp, **common)
        with rome.edited(lm, [result.update] if result.ok else []):
            (post,) = score_cases(lm, [case])
        (pre,) = score_cases(lm, [case])
        alone.append((case_metrics(pre), case_metrics(post)))
    alone_seconds = time.perf_counter() - start

    start = time.perf_counter()
    together = []
    for first in range(0, len(cases), args.batch):
        batch = cases[first : first + args.batch]
        results = rome.compute_updates(lm, requests_of(batch), hp, batch_size=len(batch), **common)
        pre = score_cases(lm, batch)
        post = score_cases(lm, batch, [r.update if r.ok else None for r in results])
        together += [(case_metrics(a), case_metrics(b)) for a, b in zip(pre, post, strict=True)]
    batched_seconds = time.perf_counter() - start

    differences = [
        (abs(a[phase][k] - b[phase][k]), case.id, ("pre", "post")[phase], k)
        for case, a, b in zip(cases, alone, together, strict=True)
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
    print(f"\n{'mode':<14}{'cases':>7}{'total s':>10}{'s / case':>10}{'cases / h':>11}")
    for name, seconds in (("one at a time", alone_seconds), ("batched", batched_seconds)):
        print(f"{name:<14}{n:>7}{seconds:>10.1f}{seconds / n:>10.2f}{3600 * n / seconds:>11.0f}")
    print(f"speed-up (batched cases/h over one at a time): {alone_seconds / batched_seconds:.2f}x")
    print(
        f"max difference of the per-case metrics: {difference:.1e} "
        f"(case {case_id}, {phase} {metric})"
    )


if __name__ == "__main__":
    main()
