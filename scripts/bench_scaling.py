"""How cost grows with the work: prompts, prompt length, model size, batch size, shards, cases.

    python scripts/bench_scaling.py                  # SmolLM2 and random GPT-2 sizes on the CPU
    python scripts/bench_scaling.py --sizes tiny-gpt2 smollm2-135m --no-eval   # quicker

Each point times the fast tracing engine on the hidden-state grid (clean and corrupted runs
included) or the batched evaluation (ROME update and scoring). Linear growth shows as a constant
time per unit; shards run as separate processes with one thread each, against one process with
one thread doing all of it. Writes scaling.json and scaling.png next to the other results.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import benchlib
import torch

from pipeline.core.patching import FastTracer, Readout, embedding_std, make_noise
from pipeline.core.patching.common import hidden_size
from pipeline.core.tokens import encode, subject_span

ROOT = benchlib.ROOT
KNOWN = ROOT / "data/samples/known_1000_sample.json"


def traced_seconds(lm, records, samples=10, batch_size=512, seed=0) -> list[float]:
    """Seconds of the fast hidden-state grid for each record (answer: the model's own token)."""
    scale = 3 * embedding_std(lm, [(r["prompt"], r["subject"]) for r in records])
    seconds = []
    for record in records:
        ids = encode(lm.tokenizer, record["prompt"])
        span = subject_span(lm.tokenizer, record["prompt"], record["subject"])
        with torch.no_grad():
            logits = lm.model(torch.tensor([ids], device=lm.device)).logits
        readout = Readout.build(ids, [int(logits[0, -1].argmax())])
        generator = torch.Generator().manual_seed(seed)
        noise = make_noise(generator, samples, span[1] - span[0], hidden_size(lm), scale)
        start = benchlib.clock(lm.device)
        with torch.no_grad():
            FastTracer(lm, readout, span, noise, batch_size).grid("hidden")
        seconds.append(benchlib.clock(lm.device) - start)
    return seconds


def model(name: str, args, threads: int | None = None):
    """SmolLM2 and the tiny test models as configured; the other sizes with random weights."""
    random = name != "smollm2-135m" and not name.startswith("tiny")
    return benchlib.load(
        argparse.Namespace(
            model=name,
            random=random,
            threads=threads or args.threads,
            device=args.device,
            dtype=args.dtype,
        )
    )


def shard_worker(args, index: int, count: int, prompts: int) -> None:
    """One shard's share of the prompts with one thread (run as a subprocess)."""
    lm = model(args.base, args, threads=1)
    traced_seconds(lm, json.loads(KNOWN.read_text())[:prompts][index::count])


def sharded_seconds(args, count: int, prompts: int) -> float:
    start = time.perf_counter()
    command = [sys.executable, __file__, "--base", args.base, "--shard-worker"]
    workers = [subprocess.Popen([*command, str(i), str(count), str(prompts)]) for i in range(count)]
    if any(w.wait() != 0 for w in workers):
        raise SystemExit("a shard worker failed")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sizes", nargs="+", default=["tiny-gpt2", "smollm2-135m", "gpt2-medium", "gpt2-large"]
    )
    parser.add_argument("--base", default="smollm2-135m", help="the model of the other panels")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--no-eval", action="store_true")
    parser.add_argument("--shard-worker", nargs=3, type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=ROOT / "results/bench/scaling")
    args = parser.parse_args()
    if args.shard_worker:
        shard_worker(args, *args.shard_worker)
        return
    records = json.loads(KNOWN.read_text())
    lm = model(args.base, args)
    out: dict[str, list] = {}

    # prompts: the same prompt k times (so only the count changes)
    per = traced_seconds(lm, records[:1] * 4)
    out["prompts"] = [[k, sum(per[:k])] for k in (1, 2, 4)]
    # prompt length in tokens, over the first 40 records
    pool = sorted(records[:40], key=lambda r: len(encode(lm.tokenizer, r["prompt"])))
    chosen = [pool[0], pool[len(pool) // 2], pool[-1]]
    out["length"] = [
        [len(encode(lm.tokenizer, r["prompt"])), s]
        for r, s in zip(chosen, traced_seconds(lm, chosen), strict=True)
    ]
    # rows per forward pass
    out["batch_size"] = [
        [b, traced_seconds(lm, records[:1], batch_size=b)[0]] for b in (32, 128, 512)
    ]
    # model size (random weights but SmolLM2 and the tiny test model)
    out["model_size"] = []
    for name in args.sizes:
        sized = lm if name == args.base else model(name, args)
        params = sum(p.numel() for p in sized.model.parameters())
        out["model_size"].append([name, params, traced_seconds(sized, records[:1])[0]])
        del sized
    # shards: 4 prompts by 1 process vs 2 processes, one thread each
    if args.device == "cpu":
        out["shards"] = [[n, sharded_seconds(args, n, 4)] for n in (1, 2)]
    if not args.no_eval:
        out["cases"] = eval_scaling(lm, args)
    report(out, args.out)


def eval_scaling(lm, args) -> list[list[float]]:
    """Seconds to edit and score k cases together (k = 1, 2, 4), with the same C and templates."""
    from pipeline.core import editing
    from pipeline.core.editing import rome
    from pipeline.core.scoring import score_cases
    from pipeline.core.second_moment import second_moment
    from pipeline.data.records import load_counterfact

    layer = lm.n_layers // 5
    hp = rome.RomeHparams(layer=layer, context_templates=((5, 10), (10, 10)), v_num_grad_steps=20)
    cases = load_counterfact(ROOT / "data/samples/counterfact-edit_sample.json", limit=4).records
    texts = benchlib.corpus(argparse.Namespace(data=benchlib.default_data()))
    stat = second_moment(lm, layer, texts, max_tokens=20000, progress=False)
    templates = editing.templates_for(lm, hp)
    rows = []
    for k in (1, 2, 4):
        batch = cases[:k]
        start = benchlib.clock(args.device)
        requests = [editing.EditRequest(c.template, c.subject, c.target_new) for c in batch]
        results = rome.compute_updates(
            lm, requests, hp, second_moment=stat, context_templates=templates, batch_size=k
        )
        score_cases(lm, batch, [r.update if r.ok else None for r in results])
        rows.append([k, benchlib.clock(args.device) - start])
    return rows


def report(out: dict, directory: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "scaling.json").write_text(
        json.dumps({**out, "machine": benchlib.machine()}, indent=1)
    )
    panels = [
        k for k in ("prompts", "length", "batch_size", "model_size", "shards", "cases") if k in out
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 2.8))
    labels = {
        "prompts": ("prompts traced", "seconds"),
        "length": ("prompt length (tokens)", "seconds per prompt"),
        "batch_size": ("rows per forward pass", "seconds per prompt"),
        "model_size": ("parameters (millions)", "seconds per prompt"),
        "shards": ("processes (1 thread each)", "seconds for 4 prompts"),
        "cases": ("cases edited and scored together", "seconds"),
    }
    for ax, key in zip(axes, panels, strict=True):
        rows = out[key]
        xs = [r[1] / 1e6 for r in rows] if key == "model_size" else [r[0] for r in rows]
        ys = [r[-1] for r in rows]
        ax.plot(xs, ys, marker="o")
        if key == "model_size":
            ax.set_xscale("log")
            ax.set_yscale("log")
        ax.set_xlabel(labels[key][0])
        ax.set_ylabel(labels[key][1])
        ax.set_title(key.replace("_", " "), fontsize=9)
    fig.tight_layout()
    fig.savefig(directory / "scaling.png", dpi=130)
    print(json.dumps(out, indent=1))
    print(f"results: {directory}")


if __name__ == "__main__":
    main()
