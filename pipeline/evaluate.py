"""Stage `evaluate`: edit CounterFact cases and score them with the paper's metrics.

    python -m pipeline.evaluate [model=...] [data=counterfact-easyedit] [editor=rome|r-rome|none]
                                [data.limit=200] [eval.cases_per_batch=8] [shard.index=i shard.count=n]
    python -m pipeline.evaluate eval.mode=sequential data.limit=100   # edits accumulate
    python -m pipeline.merge results/evaluate/<model>/<data>/<editor>   # after sharded runs

Independent mode (the paper's protocol): each case is edited on the unedited model. A batch of
cases computes its updates together and is scored together, each case's rows under its own
rank-one update (hooks, no weight copies). The unedited scores are computed once per case and
model and cached under `pre_dir`, for every editor. Each finished case is one line of
`cases-<shard>.jsonl` (appended and fsynced), so a rerun continues where a run stopped.
`summary.json` has every metric with its 95% interval and n, before ("pre") and after ("post").
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig
from tqdm.auto import tqdm

from metrics import counterfact as cf
from pipeline.app.editors import Editor
from pipeline.app.generation_scores import Reference, generation_metrics
from pipeline.app.results import (
    PreCache,
    append_jsonl,
    case_record,
    headline,
    read_jsonl,
    scored,
    summarize_records,
)
from pipeline.app.stage import Run, require_complete, stage
from pipeline.app.tracking import RunningRates
from pipeline.core.editing.requests import EditResult, update_of
from pipeline.core.models import LoadedModel
from pipeline.core.scoring import score_cases
from pipeline.data.records import CounterfactCase, load_counterfact, missing_by_shard, take_shard
from pipeline.data.sources import resolve_data_file

log = logging.getLogger(__name__)


def batches(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


# --------------------------------------------------------------------------------------------
# The stage


@stage("evaluate", resumable=True)
def main(cfg: DictConfig, run: Run) -> None:
    data_file, origin = resolve_data_file(cfg.data, cfg.paths.data)
    loaded = load_counterfact(data_file, on_error=cfg.data.on_error, limit=cfg.data.limit)
    cases: list[CounterfactCase] = loaded.records
    index, count = int(cfg.shard.index), int(cfg.shard.count)
    if not cfg.aggregate_only:
        lm = run.load_model()
        if cfg.editor.name != "none":  # the key statistics' metadata, for W&B lineage
            run.uses(Path(cfg.paths.results) / "stats" / cfg.model.name / cfg.corpus.name, "stats")
        if cfg.eval.mode == "independent":
            mine = take_shard(cases, index, count)
            run_independent(cfg, run, lm, mine, f"{index}of{count}", data_file)
        elif cfg.eval.mode == "sequential":
            run_sequential(cfg, run, lm, cases)
            return
        else:
            raise ValueError(f"eval.mode must be independent or sequential, got {cfg.eval.mode!r}")
        if count > 1:
            print(
                f"shard {index} of {count} done; when all are, combine them with\n"
                f"  python -m pipeline.merge {run.out_dir}"
            )
            return
    summarize_run(cfg, run, cases, {**loaded.report(), "origin": origin}, loaded.schema)


def summarize_run(
    cfg: DictConfig,
    run: Run,
    cases: Sequence[CounterfactCase],
    data_report: dict[str, Any],
    schema: str,
) -> None:
    """`summary.json` and the W&B summary over every case's line in the run's JSONL files."""
    records = {r["id"]: r for r in read_jsonl(sorted(run.out_dir.glob("cases-*.jsonl")))}
    wanted = [c.id for c in cases]
    count = int(cfg.shard.count)
    completeness = require_complete(
        missing_by_shard(wanted, records, count), len(wanted), count, "cases", cfg.allow_partial
    )
    done = [records[i] for i in wanted if i in records]
    if not done:
        raise SystemExit("no evaluated cases to summarize")
    summary = summarize_records(done, seed=int(cfg.seed))
    summary.update(
        {
            "model": cfg.model.name,
            "editor": cfg.editor.name,
            "data": data_report,
            "schema": schema,
            "schema_note": (
                "EasyEdit schema: one paraphrase and one neighbourhood prompt per case, no "
                "generation prompts (GE and RS are not computed)"
                if schema == "easyedit"
                else "ROME schema"
            ),
            **completeness,
        }
    )
    run.write_summary(summary)
    run.tracker.table(
        "cases",
        ["id", "subject", "target_new", "ES", "PS", "NS", "pre_NS"],
        [
            [r["id"], r["subject"], r["target_new"]]
            + [r["post"]["metrics"][k] for k in ("ES", "PS", "NS")]
            + [r["pre"]["metrics"]["NS"]]
            for r in done
        ],
    )
    for name in ("EM", "PM", "NM"):
        run.tracker.histogram(f"post/{name}", [r["post"]["metrics"][name] for r in done])
    print(headline(summary))


def run_independent(
    cfg: DictConfig,
    run: Run,
    lm: LoadedModel,
    cases: list[CounterfactCase],
    tag: str,
    data_file: Path,
) -> None:
    written = read_jsonl(sorted(run.out_dir.glob("cases-*.jsonl")))
    finished = {r["id"] for r in written}
    todo = [c for c in cases if c.id not in finished]
    mine = {c.id for c in cases}  # running ES/PS/NS on W&B while the run goes
    rates = RunningRates(r["post"]["metrics"] for r in written if r["id"] in mine)
    log.info("%d cases in this shard, %d already evaluated", len(cases), len(cases) - len(todo))
    if not todo:
        return
    editor = Editor(cfg, lm)
    pre_cache = PreCache(Path(cfg.pre_dir), tag)
    rows_per_pass = int(cfg.eval.rows_per_pass)
    with_generation = cfg.eval.generation is True or (
        cfg.eval.generation == "auto" and any(c.generation_prompts for c in cases)
    )
    references = Reference(Path(data_file).parent, cases) if with_generation else None
    bar = tqdm(total=len(todo), desc=f"evaluate {editor.name}", unit="case")
    for batch in batches(todo, int(cfg.eval.cases_per_batch)):
        started = time.perf_counter()
        results = editor.updates(batch)
        pre = pre_cache.get(lm, batch, rows_per_pass)
        updates = [update_of(r) for r in results]
        post_probs = score_cases(lm, batch, updates, batch_size=rows_per_pass)
        post = [scored(p) for p in post_probs]
        if with_generation:
            for phase, phase_updates in (("pre", [None] * len(batch)), ("post", results)):
                generated = generation_metrics(lm, batch, phase_updates, cfg, references)
                for target, extra in zip(pre if phase == "pre" else post, generated, strict=True):
                    target.update(extra)
        seconds = (time.perf_counter() - started) / len(batch)
        lines = [
            case_record(c, p, q, r, seconds)
            for c, p, q, r in zip(batch, pre, post, results, strict=True)
        ]
        append_jsonl(run.path(f"cases-{tag}.jsonl"), lines)
        running = rates.add(line["post"]["metrics"] for line in lines)
        run.tracker.log({**running, "progress/seconds_per_case": seconds})
        bar.update(len(batch))
    bar.close()


def run_sequential(
    cfg: DictConfig, run: Run, lm: LoadedModel, cases: list[CounterfactCase]
) -> None:
    """Edits accumulate; after each checkpoint every case edited so far is scored again."""
    editor = Editor(cfg, lm)
    if editor.name == "none":
        raise ValueError("sequential mode needs an editor (editor=rome or r-rome)")
    checkpoints = sorted(
        {int(n) for n in cfg.eval.checkpoints if int(n) <= len(cases)} | {len(cases)}
    )
    rows_per_pass = int(cfg.eval.rows_per_pass)
    curve = []

    def on_checkpoint(done: int, results: list[EditResult]) -> None:
        if done not in checkpoints:
            return
        probs = score_cases(lm, cases[:done], batch_size=rows_per_pass)
        summary = cf.summarize([cf.case_metrics(p) for p in probs], seed=int(cfg.seed))
        curve.append({"edits": done, "failed": sum(not r.ok for r in results), **summary})
        run.tracker.log(
            {f"sequential/{k}": summary[k]["mean"] for k in ("S", "ES", "PS", "NS")}, step=done
        )
        run.write_json("sequential.json", {"checkpoints": curve})
        print(
            f"after {done} edits: "
            + " ".join(f"{k}={summary[k]['mean']:.1f}" for k in ("S", "ES", "PS", "NS"))
        )

    editor.edit_sequentially(cases, on_checkpoint)
    run.write_summary(
        {"mode": "sequential", "model": cfg.model.name, "editor": editor.name, "checkpoints": curve}
    )


if __name__ == "__main__":
    main()
