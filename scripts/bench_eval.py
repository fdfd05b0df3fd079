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

Full protocol (`--full-cases N`, on the bundled full-schema sample, or `--full-data FILE`): per
case the 1 rewrite + 2 paraphrase + 10 neighbourhood prompts scored and the 10 generation prompts
sampled (`--max-new-tokens`, top-k `--top-k`), pre and post edit. The updates are computed once
(batched) outside the clock: both sides evaluate the same updates, only evaluation is timed.
Original: one case at a time, its update written into the weights, each (prompt, target) scored
on its own, each generation prompt sampled on its own (the issue's reading). ROME's code as
written is faster than that: `test_batch_prediction` runs a case's prompts in one padded batch
and `generate_fast` samples its 10 generation prompts together; "rome code" times that too. Pipeline: score_cases and generate over
all cases at once (batched, per-case hooks). ES/PS/NS must agree; GE is compared both from the
top-k samples (different draws: batch composition and seeds differ) and, with `--greedy-check`,
from greedy decoding (the same texts up to float rounding). `--cases 0` skips the modes above.
Measured (SmolLM2, 2 cases, 1 thread, loaded CPU): 4.48x over original, 1.23x over ROME's code;
generation is 97-98% of each protocol's time (BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import benchlib
import torch

from metrics import generation as gen
from metrics.counterfact import case_metrics
from pipeline.core import editing
from pipeline.core.editing import rome
from pipeline.core.scoring import generate, score_cases
from pipeline.core.second_moment import second_moment
from pipeline.data.records import load_counterfact


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    benchlib.add_model_arguments(parser)
    parser.add_argument("--cases", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8, help="cases per batch")
    parser.add_argument("--no-floor", action="store_true", help="skip counting FLOPs")
    parser.add_argument("--full-cases", type=int, default=0, help="cases of the full protocol")
    parser.add_argument(
        "--full-data",
        default=str(benchlib.ROOT / "data/samples/counterfact-first1000_sample.json"),
        help="full-schema (ROME) CounterFact file",
    )
    parser.add_argument("--max-new-tokens", type=int, default=100)
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--greedy-check", action="store_true", help="also compare greedy GE")
    benchlib.add_output_arguments(parser)
    return parser.parse_args()


def requests_of(cases):
    return [editing.EditRequest(c.template, c.subject, c.target_new) for c in cases]


def full_protocol(args, lm, hp, common) -> dict:
    """Cases per hour of the full protocol, original against this pipeline's, same updates."""
    cases = load_counterfact(args.full_data, limit=args.full_cases).records
    missing = [c.id for c in cases if not c.generation_prompts]
    if missing:
        raise SystemExit(f"{args.full_data}: cases {missing} have no generation prompts")
    results = rome.compute_updates(lm, requests_of(cases), hp, batch_size=len(cases), **common)
    updates = [r.update if r.ok else None for r in results]
    sampling = dict(max_new_tokens=args.max_new_tokens, top_k=args.top_k)

    def original(top_k, per_prompt=True):
        """per_prompt: the brief's reading (each prompt alone); False: ROME's code as written
        (a case's prompts in one padded batch, its 10 generation prompts in one batch)."""
        size = 1 if per_prompt else 64
        scores, texts, generation_seconds = [], [], 0.0
        for case, update in zip(cases, updates, strict=True):
            phases = []
            for edit in ([update] if update is not None else [], []):  # post, then restored
                with editing.edited(lm, edit):
                    probs = score_cases(lm, [case], batch_size=size)[0]
                    start = benchlib.clock(args.device)
                    prompts = case.generation_prompts
                    mine = [
                        text
                        for i in range(0, len(prompts), size)
                        for text in generate(
                            lm,
                            prompts[i : i + size],
                            **{**sampling, "top_k": top_k},
                            seed=args.seed + i,
                            batch_size=size,
                        )
                    ]
                    generation_seconds += benchlib.clock(args.device) - start
                phases.append(probs)
                texts.append(mine)
            scores.append((phases[1], phases[0]))
        return scores, texts, generation_seconds

    def pipeline(top_k):
        pre = score_cases(lm, cases)
        post = score_cases(lm, cases, updates)
        prompts = [p for c in cases for p in c.generation_prompts]
        owners = [u for c, u in zip(cases, updates, strict=True) for _ in c.generation_prompts]
        start = benchlib.clock(args.device)
        kw = {**sampling, "top_k": top_k, "seed": args.seed}
        flat_pre = generate(lm, prompts, **kw)
        flat_post = generate(lm, prompts, updates=owners, **kw)
        generation_seconds = benchlib.clock(args.device) - start
        texts, first = [], 0
        for c in cases:
            n = len(c.generation_prompts)
            texts += [flat_post[first : first + n], flat_pre[first : first + n]]
            first += n
        return list(zip(pre, post, strict=True)), texts, generation_seconds

    timed = {}
    modes = (
        ("original", original),
        ("rome code", lambda k: original(k, per_prompt=False)),
        ("pipeline", pipeline),
    )
    for name, run in modes:
        start = benchlib.clock(args.device)
        scores, texts, generation_seconds = run(args.top_k)
        timed[name] = (scores, texts, benchlib.clock(args.device) - start, generation_seconds)
    (a, a_texts, a_s, a_gen), (b, b_texts, b_s, b_gen) = timed["original"], timed["pipeline"]
    r_s, r_gen = timed["rome code"][2:]
    score_difference = max(
        abs(x[phase][k] - y[phase][k])
        for ref in (a, timed["rome code"][0])
        for pa, pb in zip(ref, b, strict=True)
        for x, y in [(tuple(map(case_metrics, pa)), tuple(map(case_metrics, pb)))]
        for phase in (0, 1)
        for k in x[phase]
    )

    def ge_difference(one, other):
        return max(abs(gen.fluency(s) - gen.fluency(t)) for s, t in zip(one, other, strict=True))

    n = len(cases)
    print(
        f"\nfull protocol: {n} cases x (13 prompts scored + {len(cases[0].generation_prompts)} "
        f"x {args.max_new_tokens} tokens top-{args.top_k}), pre and post, same updates"
    )
    print(f"{'protocol':10}{'cases':>7}{'total s':>10}{'gen s':>9}{'gen %':>7}{'cases / h':>11}")
    rows = (("original", a_s, a_gen), ("rome code", r_s, r_gen), ("pipeline", b_s, b_gen))
    for name, seconds, gen_s in rows:
        print(
            f"{name:10}{n:7d}{seconds:10.1f}{gen_s:9.1f}{100 * gen_s / seconds:6.0f}%"
            f"{3600 * n / seconds:11.0f}"
        )
    print(f"speed-up (pipeline cases/h over original): {a_s / b_s:.2f}x")
    print(f"speed-up (pipeline cases/h over ROME's code as written): {r_s / b_s:.2f}x")
    print(f"max difference of the per-case ES/PS/NS metrics: {score_difference:.1e}")
    sampled = ge_difference(a_texts, b_texts)
    print(f"max |GE difference| per case and phase, top-{args.top_k} samples: {sampled:.3f}")
    result = {
        "cases": n,
        "original_seconds": a_s,
        "pipeline_seconds": b_s,
        "original_generation_seconds": a_gen,
        "pipeline_generation_seconds": b_gen,
        "original_cases_per_hour": 3600 * n / a_s,
        "pipeline_cases_per_hour": 3600 * n / b_s,
        "rome_code_seconds": r_s,
        "rome_code_generation_seconds": r_gen,
        "speed_up": a_s / b_s,
        "speed_up_over_rome_code": r_s / b_s,
        "max_score_difference": score_difference,
        "max_ge_difference_sampled": sampled,
    }
    if args.greedy_check:
        greedy = ge_difference(original(1)[1], pipeline(1)[1])
        print(f"max |GE difference| per case and phase, greedy (untimed): {greedy:.1e}")
        result["max_ge_difference_greedy"] = greedy
    return result


def main():
    args = parse_args()
    lm = benchlib.load(args)
    lengths = benchlib.template_lengths(args)
    hp = rome.RomeHparams(layer=args.layer, context_templates=lengths, v_num_grad_steps=args.steps)
    sample = benchlib.ROOT / "data/samples/counterfact-edit_sample.json"
    cases = load_counterfact(sample, limit=args.cases).records if args.cases else []
    stat = second_moment(lm, args.layer, benchlib.corpus(args), max_tokens=args.stats_tokens)
    templates = editing.templates_for(lm, hp)
    common = dict(second_moment=stat, context_templates=templates)
    full = full_protocol(args, lm, hp, common) if args.full_cases else None
    if not cases:
        benchlib.write_json(args, {"benchmark": "evaluate-full", "model": lm.name, "full": full})
        return

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
        "full": full,
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
