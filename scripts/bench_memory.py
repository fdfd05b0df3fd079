"""Peak memory of each stage's work by model size, and an estimate for models that do not fit.

    python scripts/bench_memory.py                                  # tiny .. gpt2-large, gpt2-xl
    python scripts/bench_memory.py --models gpt2-xl gpt-j-6b --device cuda --dtype bfloat16

Each (model, stage) runs in its own process, so the peak is that stage's: its process's peak
resident memory on the CPU, peak allocated memory on CUDA. Stages do a small but full-sized unit
of their work: `load` only loads; `stats` streams two batches of 16 chunks of 256 tokens into C;
`trace` traces a 5-word prompt's hidden-state grid (S=10, 512 rows per pass); `evaluate` computes 8
ROME updates together (21 templates, two v* steps: one backward) and scores the 8 cases under
them. Models other than SmolLM2 and the tiny ones have random weights (their architecture).

Peaks grow with the weights plus activations; the estimate fits, per stage,
peak = weights + a + b * (layers x width) over the models measured, and predicts the others from
their configuration (weights at --dtype). Compare with a model that fits (gpt2-xl on 24 GiB).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import benchlib
import torch
import yaml

STAGES = ("load", "stats", "trace", "evaluate")
MODELS = ("tiny-gpt2", "smollm2-135m", "gpt2-medium", "gpt2-large", "gpt2-xl")
PRETRAINED = ("tiny-gpt2", "tiny-llama", "smollm2-135m")  # runnable here without the hub
LAYERS = {"gpt2-medium": 8, "gpt2-large": 12, "gpt2-xl": 17, "gpt-j-6b": 5, "smollm2-135m": 6}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--fit", nargs="+", help="models the estimate is fitted on")
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    parser.add_argument("--predict", nargs="*", default=["gpt2-xl", "gpt-j-6b"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--data", default=benchlib.default_data())
    parser.add_argument("--child", nargs=2, metavar=("MODEL", "STAGE"), help=argparse.SUPPRESS)
    benchlib.add_output_arguments(parser)
    return parser.parse_args()


def describe(model: torch.nn.Module) -> dict:
    config = model.config
    return {
        "layers": config.num_hidden_layers,
        "width": config.hidden_size,
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def shape(name: str) -> dict:
    """Layers, width and parameter count of a model from its `arch` config (built on the meta
    device: no memory, no weights)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    arch = dict(yaml.safe_load((benchlib.ROOT / "conf/model" / f"{name}.yaml").read_text())["arch"])
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(
            AutoConfig.for_model(arch.pop("model_type"), **arch)
        )
    return describe(model)


def child(args: argparse.Namespace) -> None:
    """One stage's unit of work on one model; prints its peak memory as JSON."""
    from pipeline.core import editing
    from pipeline.core.editing import rome
    from pipeline.core.patching import trace
    from pipeline.core.scoring import score_cases
    from pipeline.core.second_moment import second_moment
    from pipeline.core.tokens import encode, subject_span, target_ids
    from pipeline.data.records import load_counterfact

    name, stage = args.child
    load = argparse.Namespace(
        model=name,
        random=name not in PRETRAINED,
        device=args.device,
        dtype=args.dtype,
        threads=0,
        data=args.data,
    )
    lm = benchlib.load(load)
    layer = LAYERS.get(name, 1)
    if stage == "stats":
        texts = benchlib.corpus(load)
        second_moment(lm, layer, texts, max_tokens=2 * 16 * 256, batch_size=16, progress=False)
    elif stage == "trace":
        prompt, subject = "Paris is the capital of", "Paris"  # short: the grid grows as T²
        ids = encode(lm.tokenizer, prompt)
        answer = target_ids(lm.tokenizer, "French", prompt)
        trace(lm, ids, subject_span(lm.tokenizer, prompt, subject), answer, batch_size=512)
    elif stage == "evaluate":
        path = benchlib.ROOT / "data/samples/counterfact-edit_sample.json"
        cases = load_counterfact(path, limit=8).records
        hp = rome.RomeHparams(layer=layer, v_num_grad_steps=2, reject_already_predicted=False)
        requests = [editing.EditRequest(c.template, c.subject, c.target_new) for c in cases]
        results = rome.compute_updates(lm, requests, hp, second_moment=None, batch_size=8)
        score_cases(lm, cases, [r.update if r.ok else None for r in results])
    print(
        json.dumps({"peak_memory_gib": benchlib.peak_memory_gib(args.device), **describe(lm.model)})
    )


def measure(args: argparse.Namespace, name: str, stage: str) -> dict:
    """{peak_memory_gib, layers, width, parameters} of one stage's process."""
    script = Path(__file__).resolve()
    argv = [sys.executable, str(script), "--child", name, stage, "--device", args.device]
    argv += ["--dtype", args.dtype, "--data", str(args.data)]
    done = subprocess.run(argv, capture_output=True, text=True, cwd=benchlib.ROOT)
    if done.returncode != 0:
        raise SystemExit(f"{name} {stage} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def fit(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least squares y = a + b x."""
    n = len(points)
    mean_x = sum(x for x, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    var = sum((x - mean_x) ** 2 for x, _ in points)
    b = sum((x - mean_x) * (y - mean_y) for x, y in points) / var if var else 0.0
    return mean_y - b * mean_x, b


def main() -> None:
    args = parse_args()
    if args.child:
        child(args)
        return
    size = torch.tensor([], dtype=getattr(torch, args.dtype)).element_size()
    shapes: dict[str, dict] = {}
    measured: dict[str, dict[str, float]] = {}
    print(f"{'model':<14}{'params':>8}{'weights':>9}" + "".join(f"{s:>10}" for s in args.stages))
    for name in args.models:
        runs = {stage: measure(args, name, stage) for stage in args.stages}
        shapes[name] = {
            k: v for k, v in next(iter(runs.values())).items() if k != "peak_memory_gib"
        }
        measured[name] = {stage: run["peak_memory_gib"] for stage, run in runs.items()}
        weights = shapes[name]["parameters"] * size / 2**30
        cells = "".join(f"{measured[name][s]:>10.2f}" for s in args.stages)
        print(
            f"{name:<14}{shapes[name]['parameters'] / 1e6:>7.0f}M{weights:>9.2f}{cells}", flush=True
        )
    for name in args.predict:
        shapes.setdefault(name, shape(name))

    fitted = args.fit or [m for m in args.models if m not in args.predict]
    estimates = {}
    if len(fitted) >= 2 and args.predict:
        print(f"\nestimate (GiB) from {', '.join(fitted)}: weights + a + b x layers x width")
        for stage in args.stages:
            points = [
                (
                    shapes[m]["layers"] * shapes[m]["width"],
                    measured[m][stage] - shapes[m]["parameters"] * size / 2**30,
                )
                for m in fitted
            ]
            a, b = fit(points)
            for name in args.predict:
                s = shapes[name]
                guess = s["parameters"] * size / 2**30 + a + b * s["layers"] * s["width"]
                estimates.setdefault(name, {})[stage] = guess
        for name, by_stage in estimates.items():
            cells = "".join(f"{by_stage[s]:>10.2f}" for s in args.stages)
            seen = measured.get(name)
            print(f"{name:<14}{'estimate':>17}{cells}")
            if seen:
                cells = "".join(f"{seen[s]:>10.2f}" for s in args.stages)
                print(f"{name:<14}{'measured':>17}{cells}")
    benchlib.write_json(
        args,
        {
            "benchmark": "memory",
            "device": args.device,
            "dtype": args.dtype,
            "shapes": shapes,
            "measured_gib": measured,
            "estimated_gib": estimates,
        },
    )


if __name__ == "__main__":
    main()
