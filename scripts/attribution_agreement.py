"""Attribution patching (trace.engine=attribution) against the exact trace of SmolLM2's known facts.

    ROME_DATA=/work/shared/data python scripts/attribution_agreement.py --threads 1
    ROME_DATA=/work/shared/data python scripts/attribution_agreement.py --limit 10 --exact 2

The exact trace's averages over the 279 facts SmolLM2 knows of ROME's known_1000 are committed
(reports/default_smollm2/inputs/trace/..., `--exact-dir`); its per-prompt files are not. So:

- the screen runs on the same facts with the same settings and the same noise per prompt (the
  trace stage's seed rule, its noise scale from the committed summary), both linearizations;
  its bucket averages are set beside the committed ones, per kind, with the correlation and
  largest difference of the (bucket, layer) averages, the peaks and the report's readings
  (early MLP site, late attention site, severed paths) under both;
- the first `--exact N` facts are also traced exactly (the fast engine) in this run: per kind,
  the per-cell correlation and error of the estimated effects (cells from the first subject
  token on; earlier ones are equal by construction), where the error is largest, and the
  prompts per second of both engines on the same prompts (the benchmark row; `--json`).

`--save FILE` keeps what the reference report reads (pipeline.app.agreement): the screen's
averages under both linearizations and the prompts traced both ways, not the other grids.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

import benchlib
import torch
import yaml

from pipeline.app import agreement
from pipeline.app.findings import read_results
from pipeline.app.stage import git_state
from pipeline.core import files
from pipeline.core.patching import (
    AttributionTracer,
    Readout,
    resolve_noise,
    trace_all_kinds,
    trace_severed,
)
from pipeline.core.recall import check_known
from pipeline.core.tokens import encode, subject_span
from pipeline.data.records import load_known
from pipeline.trace import aggregate

ROOT = Path(__file__).resolve().parents[1]
EXACT = ROOT / "reports/default_smollm2/inputs/trace/smollm2-135m/known_1000"
MODES = ("prob", "logprob")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="conf/model/<name>.yaml or a path")
    parser.add_argument("--random", action="store_true", help="random weights (a dry run)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--data", default=os.environ.get("ROME_DATA", str(ROOT / "data")))
    parser.add_argument("--exact-dir", type=Path, default=EXACT)
    parser.add_argument("--limit", type=int, default=None, help="only the first N known facts")
    parser.add_argument("--exact", type=int, default=0, help="trace the first N exactly too")
    parser.add_argument("--save", type=Path, help="write the per-prompt records here (JSON)")
    benchlib.add_output_arguments(parser)
    return parser.parse_args()


def known_facts(lm, data_root: str, expected: int) -> list[dict[str, Any]]:
    """The known_1000 facts the model knows (the trace stage's rule), sorted by id."""
    loaded = load_known(Path(data_root) / "known_1000.json", on_error="skip")
    recalls = check_known(lm, loaded.records, batch_size=32, progress=False)
    facts = [{**r.fact.to_dict(), "answer_ids": list(r.answer_ids)} for r in recalls if r.known]
    if len(facts) != expected:
        print(f"WARNING: the model knows {len(facts)} facts, the exact trace traced {expected}")
    return sorted(facts, key=lambda f: f["id"])


def record(fact, span, window, clean, corrupted, grids, severed) -> dict[str, Any]:
    """The fields of a trace stage prompt file that `pipeline.trace.aggregate` reads."""
    return {
        "id": fact["id"],
        "subject_span": list(span),
        "window": window,
        "clean": clean,
        "corrupted": corrupted,
        "kinds": {kind: grid.tolist() for kind, grid in grids.items()},
        "severed": {name: values.tolist() for name, values in severed.items()},
    }


def per_cell_table(exact: list[dict], estimate: dict[str, list[dict]], kinds: list[str]) -> None:
    print(f"\nper cell, {len(exact)} prompts traced exactly too (effects: restored - corrupted)")
    print("kind           mode      r      MAE      max|err|  mean|exact|  largest mean error at")
    for mode, records in estimate.items():
        for row in agreement.per_cell(exact, records, kinds):
            worst = row.get("worst")
            print(
                f"{row['kind']:14s} {mode:8s} {row['r']:6.3f} {row['mae']:8.4f} "
                f"{row['max_error']:8.4f}  {row['mean_abs_exact']:10.4f}   "
                + (f"{worst['bucket']}, layer {worst['layer']}" if worst else "")
            )


def side_by_side(exact: dict[str, Any], estimates: dict[str, dict[str, Any]]) -> None:
    """The bucket averages of the exact trace and the estimates, their agreement, readings."""
    print(
        f"\nbucket averages: exact (n = {exact['n_prompts']}) vs estimates (n = "
        f"{next(iter(estimates.values()))['n_prompts']}), pooling {exact['pooling']}"
    )
    for mode, averages in estimates.items():
        for row in agreement.on_averages(exact, averages):
            peaks = ", ".join(
                f"{bucket} {p['exact']}/{p['estimate']}" for bucket, p in row["peaks"].items()
            )
            print(
                f"  {row['kind']:6s} {mode:8s} r {row['r']:.3f}, max |diff| "
                f"{row['max_difference']:.4f}, mean |diff| {row['mean_difference']:.4f} (largest "
                f"exact average {row['largest_exact']:.4f}); peak layer exact/estimate: {peaks}"
            )
    print("\nthe report's readings (verdict: evidence):")
    for name, averages in {"exact": exact, **estimates}.items():
        for finding in read_results(averages, [], [], {}):
            print(f"  [{name}] {finding.name}: {finding.verdict}: {finding.evidence}")


def main() -> None:
    args = parse_args()
    lm = benchlib.load(args)
    summary = files.read_json(args.exact_dir / "summary.json")
    config = yaml.safe_load((args.exact_dir / "config.yaml").read_text())
    options, seed = config["trace"], int(config["seed"])
    kinds, window = list(options["kinds"]), int(options["window"])
    exact_averages = files.read_json(args.exact_dir / "averages.json")
    facts = known_facts(lm, args.data, summary["facts"])[: args.limit]
    print(
        f"model {lm.name}, {torch.get_num_threads()} threads; {len(facts)} facts; S="
        f"{options['samples']}, window {window}, noise scale {summary['noise_scale']:.4f}"
    )
    estimates: dict[str, list[dict]] = {mode: [] for mode in MODES}
    exact: list[dict] = []
    screen_seconds, exact_seconds, screen_on_exact = 0.0, 0.0, 0.0
    for number, fact in enumerate(facts):
        ids = encode(lm.tokenizer, fact["prompt"])
        span = subject_span(lm.tokenizer, fact["prompt"], fact["subject"])
        noise = resolve_noise(
            lm, ids, span, samples=int(options["samples"]), scale=summary["noise_scale"],
            distribution=options["distribution"], seed=seed * 1_000_003 + int(fact["id"]),
        )  # fmt: skip
        readout = Readout.build(ids, fact["answer_ids"], options["whole_answer"])
        started = time.perf_counter()
        tracer = AttributionTracer(lm, readout, span, noise)
        for mode in MODES:
            tracer.linearize = mode
            grids = {kind: tracer.grid(kind, window) for kind in kinds}
            severed = tracer.severed()
            estimates[mode].append(
                record(fact, span, window, tracer.clean, tracer.corrupted, grids, severed)
            )
            if mode == MODES[0]:
                seconds = time.perf_counter() - started  # one mode: what the stage pays
        screen_seconds += seconds
        if number < args.exact:
            started = time.perf_counter()
            how = dict(noise=noise, window=window, whole_answer=options["whole_answer"])
            results = trace_all_kinds(lm, ids, span, fact["answer_ids"], kinds=kinds, **how)
            cut = trace_severed(lm, ids, span, fact["answer_ids"], noise=noise)
            exact_seconds += time.perf_counter() - started
            screen_on_exact += seconds
            first = next(iter(results.values()))
            grids = {kind: r.restored for kind, r in results.items()}
            exact.append(
                record(fact, span, window, first.clean, first.corrupted, grids, cut.restored)
            )
        if number < 10 or (number + 1) % 50 == 0:
            print(
                f"  [{number + 1}/{len(facts)}] screen {screen_seconds / (number + 1):.2f} s/prompt"
            )
    speed = {
        "screen_prompts_per_second": len(facts) / screen_seconds,
        "screen_hours_per_1000_prompts": 1000 * screen_seconds / len(facts) / 3600,
    }
    print(
        f"\nscreen: {len(facts)} prompts in {screen_seconds:.1f} s, "
        f"{speed['screen_prompts_per_second']:.3f} prompts/s "
        f"({speed['screen_hours_per_1000_prompts']:.2f} h per 1,000 prompts)"
    )
    if exact:
        speed["exact_prompts_per_second"] = len(exact) / exact_seconds
        speed["screen_prompts_per_second_same_prompts"] = len(exact) / screen_on_exact
        speed["speedup"] = exact_seconds / screen_on_exact
        print(
            f"same {len(exact)} prompts, one run: exact fast engine "
            f"{speed['exact_prompts_per_second']:.4f} prompts/s, screen "
            f"{speed['screen_prompts_per_second_same_prompts']:.3f} prompts/s: "
            f"{speed['speedup']:.0f}x"
        )
        per_cell_table(exact, {m: r[: len(exact)] for m, r in estimates.items()}, kinds)
    pooling = exact_averages["pooling"]
    averages = {mode: aggregate(records, kinds, pooling) for mode, records in estimates.items()}
    if args.save:  # compact: the screen's averages, and the prompts traced both ways
        files.write_json(
            args.save,
            {
                "facts": len(facts),
                "kinds": kinds,
                "noise_scale": summary["noise_scale"],
                "exact_dir": str(args.exact_dir),
                "averages": averages,
                "exact": exact,
                "estimates": {m: r[: len(exact)] for m, r in estimates.items()},
                "speed": speed,
                "threads": torch.get_num_threads(),
                "git": git_state(),
                "machine": benchlib.machine(),
            },
        )
    side_by_side(exact_averages, averages)
    benchlib.write_json(
        args,
        {"benchmark": "attribution", "model": lm.name, "device": str(lm.device),
         "prompts": len(facts), "exact_prompts": len(exact), **speed},
    )  # fmt: skip


if __name__ == "__main__":
    main()
