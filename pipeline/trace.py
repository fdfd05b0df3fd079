"""Stage `trace`: causal tracing over the facts the model knows, and its figures.

    python -m pipeline.trace [model=...] [trace.limit=N] [shard.index=i shard.count=n]
    python -m pipeline.merge results/trace/<model>/<data>   # combine the finished shards

Each traced fact gets one file, `prompts/<id>.json`, written atomically, so a rerun skips the
finished ones and any number of shards can write into the same directory. The aggregate step
averages the indirect effects by token bucket and layer (with 95% intervals and per-bucket
sample counts), draws the figures and writes `summary.json`; the same files give the same
numbers however they were sharded.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from metrics.intervals import column_mean_ci, mean_ci
from pipeline.app import figures
from pipeline.app.stage import Run, require_complete, stage
from pipeline.core import files
from pipeline.core.models import LoadedModel
from pipeline.core.patching import (
    BUCKETS,
    ESTIMATES,
    POOLINGS,
    TraceOptions,
    average_by_bucket,
    embedding_std,
    prompt_bucket_row,
    trace_all_kinds,
    trace_severed,
)
from pipeline.core.recall import check_known, too_long
from pipeline.core.tokens import encode, subject_span
from pipeline.data.records import load_known, missing_by_shard, take_shard
from pipeline.data.sources import derived_provenance, resolve_data_file

log = logging.getLogger(__name__)


def known_facts(
    cfg: DictConfig, lm: LoadedModel
) -> tuple[list[dict[str, Any]], str, dict[str, Any]]:
    """The facts to trace: those the model knows (the `known` stage's output, or computed here),
    where they came from, and the data report (records loaded, skipped and why).

    With `trace.facts=all`, every fact is traced with the model's own first predicted token as
    the answer — meaningless for science, useful to exercise random-weight models.
    """
    path = Path(cfg.known_dir) / "known.json"
    if cfg.trace.facts == "known" and path.exists():
        if _same_inputs(Path(cfg.known_dir) / "config.yaml", cfg):
            summary = Path(cfg.known_dir) / "summary.json"
            report = files.read_json(summary).get("data", {}) if summary.exists() else {}
            return files.read_json(path), str(path), report
        log.warning("ignoring %s: it was computed with other data or model settings", path)
    data_file, _ = resolve_data_file(cfg.data, cfg.paths.data, cfg.paths.cache)
    loaded = load_known(data_file, on_error=cfg.data.on_error, limit=cfg.data.limit)
    loaded.reject(lambda fact: too_long(lm, fact), cfg.data.on_error)
    for error in loaded.skipped[:20]:
        log.warning("skipped a bad record: %s", error)
    if loaded.skipped:
        log.warning("%d bad records of %s skipped", len(loaded.skipped), data_file)
    log.info("checking which of %d facts the model knows", len(loaded.records))
    recalls = check_known(lm, loaded.records, batch_size=int(cfg.known_batch_size))
    if cfg.trace.facts == "all":
        answers = [list(r.predicted_ids[:1]) for r in recalls]
    elif cfg.trace.facts == "known":
        answers = [list(r.answer_ids) if r.known else None for r in recalls]
    else:
        raise ValueError(f"trace.facts must be 'known' or 'all', got {cfg.trace.facts!r}")
    facts = [
        {**r.fact.to_dict(), "answer_ids": answer, "first_token_prob": r.first_token_prob}
        for r, answer in zip(recalls, answers, strict=True)
        if answer is not None
    ]
    return facts, f"{cfg.trace.facts} facts of {data_file}", loaded.report()


def _same_inputs(known_config: Path, cfg: DictConfig) -> bool:
    """Whether a `known` run used this model, dtype, data file and record limit."""
    if not known_config.exists():
        return False
    theirs = OmegaConf.load(known_config)
    ours = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    keys = ("model", "data", "dtype", "paths.data")
    return all(OmegaConf.select(theirs, key) == OmegaConf.select(ours, key) for key in keys)


def trace_options(options: dict[str, Any], seed: int) -> TraceOptions:
    """The `trace:` config section (scale resolved) as the tracer's options, for one fact."""
    names = {f.name for f in dataclasses.fields(TraceOptions)} - {"seed"}
    return TraceOptions(seed=seed, **{k: v for k, v in options.items() if k in names})


def trace_fact(
    lm: LoadedModel, fact: dict[str, Any], options: dict[str, Any], seed: int
) -> dict[str, Any]:
    """All kinds and the severed paths for one fact, on one noise draw seeded by the fact."""
    ids = encode(lm.tokenizer, fact["prompt"])
    span = subject_span(lm.tokenizer, fact["prompt"], fact["subject"])
    how = trace_options(options, seed)
    results = trace_all_kinds(lm, ids, span, fact["answer_ids"], how, kinds=options["kinds"])
    record: dict[str, Any] = {
        "id": fact["id"],
        "prompt": fact["prompt"],
        "subject": fact["subject"],
        "tokens": [lm.tokenizer.decode([t]) for t in ids],
        "subject_span": list(span),
        "answer": lm.tokenizer.decode(fact["answer_ids"]),
        "answer_ids": list(fact["answer_ids"]),
        "seed": seed,
        "window": options["window"],
        # an attribution-patching estimate of the restored probabilities, not restored runs
        "estimate": how.engine in ESTIMATES,
        "kinds": {},
    }
    for kind, result in results.items():
        record["clean"], record["corrupted"] = result.clean, result.corrupted
        record["kinds"][kind] = result.restored.tolist()
    if options["severed"]:
        severed = trace_severed(lm, ids, span, fact["answer_ids"], how)
        record["severed"] = {name: values.tolist() for name, values in severed.restored.items()}
        record["severed_token"] = severed.token
    return record


def read_prompt(path: Path, fact_id: int, kinds: list[str]) -> dict[str, Any]:
    """A traced prompt's file, or ValueError saying why it cannot be used (a torn or edited
    file must be traced again, not counted as done or crash the aggregate unnamed)."""
    try:
        record = files.read_json(path)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: unreadable ({type(error).__name__}: {error})") from None
    if not isinstance(record, dict) or record.get("id") != fact_id:
        raise ValueError(f"{path}: not the record of fact {fact_id}")
    absent = [k for k in ("clean", "corrupted", "subject_span") if k not in record] + [
        f"kinds.{k}" for k in kinds if k not in (record.get("kinds") or {})
    ]
    if absent:
        raise ValueError(f"{path}: missing {', '.join(absent)}")
    return record


def intact_prompts(
    prompts_dir: Path, ids: list[int], kinds: list[str]
) -> tuple[dict[int, dict[str, Any]], dict[int, str]]:
    """The usable traced prompts among `ids`, and the damaged ones with why (each logged)."""
    records, damaged = {}, {}
    for fact_id in ids:
        path = prompts_dir / f"{fact_id}.json"
        if not path.exists():
            continue
        try:
            records[fact_id] = read_prompt(path, fact_id, kinds)
        except ValueError as error:
            damaged[fact_id] = str(error)
            log.warning("damaged traced prompt, not counted as done: %s", error)
    return records, damaged


def aggregate(
    records: list[dict[str, Any]], kinds: list[str], pooling: str = "prompt"
) -> dict[str, Any]:
    """Average indirect effects per bucket and layer, per kind; the severed-path averages.

    Both poolings of token positions are kept (`poolings`: `prompt` and `paper`, see
    `pipeline.core.patching.aggregate`); `kinds` is the one `pooling` names, which the figures
    show.
    """
    out: dict[str, Any] = {
        "n_prompts": len(records),
        "buckets": list(BUCKETS),
        "pooling": pooling,
        "poolings": {},
        "window": records[0].get("window", 10) if records else None,  # MLP/attn: layers restored
        "estimate": any(r.get("estimate", False) for r in records),  # see trace_fact
    }
    spans = [tuple(r["subject_span"]) for r in records]
    for how in POOLINGS:
        out["poolings"][how] = {}
        for kind in kinds:
            effects = [np.asarray(r["kinds"][kind]) - r["corrupted"] for r in records]
            average = average_by_bucket(effects, spans, pooling=how)
            out["poolings"][how][kind] = {
                "mean": average.mean.tolist(),
                "low": average.low.tolist(),
                "high": average.high.tolist(),
                "count": average.count.tolist(),
            }
    out["kinds"] = out["poolings"][pooling]
    with_severed = [r for r in records if "severed" in r]
    if with_severed:
        out["severed"] = {}
        for name in with_severed[0]["severed"]:
            effects = np.stack(
                [np.asarray(r["severed"][name]) - r["corrupted"] for r in with_severed]
            )
            out["severed"][name] = _mean_ci(effects)
    out["clean"] = _mean_ci(np.array([[r["clean"]] for r in records]))
    out["corrupted"] = _mean_ci(np.array([[r["corrupted"]] for r in records]))
    out["paired"] = paired_contrasts(records, out)
    return out


def paired_contrasts(records: list[dict[str, Any]], averages: dict[str, Any]) -> dict[str, Any]:
    """The differences the report's trace verdicts rest on, per prompt, with paired 95% t
    intervals (`mean_ci` of the per-prompt differences; n counts the prompts that have both).

    Both sides of each comparison come from the same prompts, so the interval of the
    per-prompt difference is the one that answers "is A above B"; the two averages' own
    intervals ignore the pairing and can only be wider. Each is A minus B:
      - `mlp_site`: the MLP effect at the last subject token minus that at the last token;
      - `attn_site`: attention's effect at the last token minus that at the last subject token;
        (each side at the layer where its average, in `averages["kinds"]`, peaks: chosen on
        the same prompts, which lifts both sides of the difference a little);
      - `severed`: the last subject token's hidden-state effect with attention severed minus
        with the MLPs severed, averaged over the lower half of the layers.
    """
    pooling, paired = averages["pooling"], {}
    sides = {
        "mlp_site": ("mlp", "last_subject", "last"),
        "attn_site": ("attn", "last", "last_subject"),
    }
    for name, (kind, high, low) in sides.items():
        stats_ = averages["kinds"].get(kind)
        if stats_ is None:
            continue
        rows = {b: np.asarray(stats_["mean"][BUCKETS.index(b)], dtype=float) for b in (high, low)}
        if not all(np.isfinite(row).any() for row in rows.values()):
            continue
        layer = {b: int(np.nanargmax(row)) for b, row in rows.items()}
        differences = []
        for record in records:
            effect = np.asarray(record["kinds"][kind]) - record["corrupted"]
            span = tuple(record["subject_span"])
            a, b = (prompt_bucket_row(effect, span, BUCKETS.index(x), pooling) for x in (high, low))
            if a is not None and b is not None:
                differences.append(a[layer[high]] - b[layer[low]])
        if differences:
            paired[name] = {
                "kind": kind,
                "minus": [[high, layer[high]], [low, layer[low]]],
                **mean_ci(differences),
            }
    with_severed = [r for r in records if {"mlp", "attn"} <= set(r.get("severed", {}))]
    if with_severed:
        half = len(with_severed[0]["severed"]["mlp"]) // 2
        differences = [
            float(np.mean(np.asarray(r["severed"]["attn"][:half]) - r["severed"]["mlp"][:half]))
            for r in with_severed
        ]
        paired["severed"] = {"minus": ["attn", "mlp"], "layers": [0, half], **mean_ci(differences)}
    return paired


def _mean_ci(rows: np.ndarray) -> dict[str, Any]:
    """Column means with 95% t intervals over the rows (one row per prompt), as JSON."""
    mean, low, high, n = column_mean_ci(rows)
    return {"mean": mean.tolist(), "low": low.tolist(), "high": high.tolist(), "n": n}


def headline(averages: dict[str, Any]) -> dict[str, Any]:
    """Where the effect peaks at the last subject token, per kind (the paper's main finding)."""
    last_subject = BUCKETS.index("last_subject")
    last = BUCKETS.index("last")
    peaks = {}
    for kind, stats_ in averages["kinds"].items():
        row = np.asarray(stats_["mean"][last_subject], dtype=float)
        if np.isfinite(row).any():
            peaks[kind] = {
                "last_subject_peak_layer": int(np.nanargmax(row)),
                "last_subject_peak_effect": float(np.nanmax(row)),
                "last_token_peak_layer": int(
                    np.nanargmax(np.asarray(stats_["mean"][last], dtype=float))
                )
                if np.isfinite(np.asarray(stats_["mean"][last], dtype=float)).any()
                else None,
            }
    return peaks


@stage("trace", resumable=True)
def main(cfg: DictConfig, run: Run) -> None:
    prompts_dir = run.path("prompts")
    prompts_dir.mkdir(exist_ok=True)
    options = OmegaConf.to_container(cfg.trace, resolve=True)
    kinds = list(options["kinds"])
    data_file, _ = resolve_data_file(cfg.data, cfg.paths.data, cfg.paths.cache)
    # A resume must see the same records; a derived file (known-union) names its sources.
    run.check_data(data_file, **derived_provenance(data_file))
    lm = run.load_model()
    facts, facts_source, data_report = known_facts(cfg, lm)
    if facts_source == str(Path(cfg.known_dir) / "known.json"):
        run.uses(Path(cfg.known_dir), "known")  # W&B lineage: known -> trace
    facts = sorted(facts, key=lambda f: f["id"])
    if not facts:
        raise SystemExit(
            f"no known facts to trace (from {facts_source}): the model predicts none of the "
            "facts' answers (a random or very small model does not). Pass trace.facts=all to "
            "trace every fact; on a random model the trace shows the plumbing, not knowledge."
        )
    # One scale for every prompt, shard and limit: the std of subject-token embeddings over all
    # the known facts, so a run limited to a few prompts and its continuation agree.
    if options["scale"] is None:
        std = embedding_std(lm, [(f["prompt"], f["subject"]) for f in facts])
        options["scale"] = float(options["noise_multiplier"]) * std
    if options["limit"] is not None:
        facts = facts[: int(options["limit"])]
    if not cfg.aggregate_only:
        mine = take_shard(facts, int(cfg.shard.index), int(cfg.shard.count))
        done, damaged = intact_prompts(prompts_dir, [f["id"] for f in mine], kinds)
        todo = [f for f in mine if f["id"] not in done]
        log.info("%d facts in this shard, %d already traced", len(mine), len(mine) - len(todo))
        if damaged:
            print(f"tracing {len(damaged)} damaged prompt files again: {sorted(damaged)}")
        started = time.time()
        for fact in tqdm(todo, desc="tracing", unit="prompt"):
            one = time.perf_counter()
            record = trace_fact(lm, fact, options, seed=int(cfg.seed) * 1_000_003 + int(fact["id"]))
            record["seconds"] = round(time.perf_counter() - one, 3)
            files.write_json(prompts_dir / f"{fact['id']}.json", record)
        elapsed = time.time() - started
        if todo:
            print(
                f"traced {len(todo)} prompts in {elapsed:.1f} s ({len(todo) / elapsed:.3f} prompts/s)"
            )
    examples = [trace_example(lm, example, options, int(cfg.seed)) for example in cfg.examples]
    for index, record in enumerate(examples):
        run.write_json(f"example_{index}.json", record)
    count = int(cfg.shard.count)
    if count > 1 and not cfg.aggregate_only:
        print(
            f"shard {cfg.shard.index} of {count} done; when all are, combine them with\n"
            f"  python -m pipeline.merge {run.out_dir}"
        )
        return
    ids = [f["id"] for f in facts]
    finished, damaged = intact_prompts(prompts_dir, ids, kinds)
    completeness = require_complete(
        missing_by_shard(ids, finished, count), len(ids), count, "prompts", cfg.allow_partial
    )
    records = [finished[i] for i in ids if i in finished]
    if not records:
        raise SystemExit("no traced prompts to aggregate")
    averages = aggregate(records, list(options["kinds"]), options.get("buckets", "prompt"))
    run.write_json("averages.json", averages)
    # The file `known` read too (reusing its facts requires the same data and paths.data).
    data_file, data_origin = resolve_data_file(cfg.data, cfg.paths.data, cfg.paths.cache)
    figure_paths = figures.trace_figures(run.path("figures"), averages, examples, cfg.model.name)
    run.tracker.images({f"figures/{name}": path for name, path in figure_paths.items()})
    summary = {
        "model": cfg.model.name,
        "facts": len(facts),
        "facts_source": facts_source,
        "data_file": str(data_file),
        "data_origin": data_origin,  # "bundled sample" when the data root lacks the file
        "traced": len(records),
        **completeness,
        "damaged": {str(i): reason for i, reason in sorted(damaged.items())[:100]},
        "data": data_report,
        "skipped": data_report.get("skipped", 0),
        "noise_scale": options["scale"],
        "samples": options["samples"],
        "window": options["window"],
        "engine": options["engine"],
        "estimate": averages["estimate"],
        "mean_clean": averages["clean"]["mean"][0],
        "mean_corrupted": averages["corrupted"]["mean"][0],
        "peaks": headline(averages),
        "figures": {name: str(path) for name, path in figure_paths.items()},
        # compute time of every sitting together: the traced prompts' own seconds, summed
        "seconds": round(sum(r.get("seconds", 0.0) for r in records), 1),
    }
    run.write_summary(summary)
    print(json.dumps(summary["peaks"], indent=1))


def trace_example(
    lm: LoadedModel, example: Any, options: dict[str, Any], seed: int
) -> dict[str, Any]:
    """A single prompt for the heatmaps; its answer is the model's own greedy next token."""
    ids = encode(lm.tokenizer, example.prompt)
    with torch.no_grad():
        answer = int(lm.model(torch.tensor([ids], device=lm.device)).logits[0, -1].argmax())
    fact = {"id": -1, "prompt": example.prompt, "subject": example.subject, "answer_ids": [answer]}
    return trace_fact(lm, fact, options, seed=seed)


if __name__ == "__main__":
    main()
