"""The evaluate stage on zsRE (`data=zsre`): ROME's and MEMIT's zsRE protocol, independent edits.

Each question is edited on the unedited model (a batch of cases is edited and scored together,
each case's rows under its own update, as for CounterFact) and scored before and after by the
top-1 accuracy of its answer tokens (`metrics.zsre`). One line per finished case goes to
`zsre-cases-<shard>.jsonl` (appended and fsynced; a rerun continues), named apart from
CounterFact's `cases-*.jsonl` so that Table 4 never reads them; `summary.json` has efficacy,
paraphrase and specificity with their 95% intervals and n, before ("pre") and after ("post").
Mass and sequential editing on zsRE are not implemented: they stop with a message.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig
from tqdm.auto import tqdm

from metrics import zsre as zm
from pipeline.app.damage import record_texts
from pipeline.app.editors import CaseEditor
from pipeline.app.protocols import independent_perplexity
from pipeline.app.results import append_jsonl, edit_summary, read_jsonl
from pipeline.app.stage import Run, finished_records
from pipeline.core import files
from pipeline.core.editing.requests import EditResult, update_of
from pipeline.core.models import LoadedModel
from pipeline.core.scoring import score_zsre_cases
from pipeline.data.records import Loaded, ZsreCase, load_zsre, take_shard

log = logging.getLogger(__name__)

CASES_GLOB = "zsre-cases-*.jsonl"


def check_mode(cfg: DictConfig) -> None:
    """Refuse what the zsRE path does not do, before anything is loaded."""
    if cfg.eval.mode != "independent":
        raise SystemExit(
            f"eval.mode={cfg.eval.mode} is not implemented for zsRE (data={cfg.data.name}): "
            "zsRE is evaluated with independent edits only (eval.mode=independent), as in the "
            "ROME paper; mass and sequential curves run on CounterFact."
        )


def load(cfg: DictConfig, data_file: Path) -> Loaded:
    return load_zsre(
        data_file,
        on_error=cfg.data.on_error,
        limit=cfg.data.limit,
        target=cfg.data.get("target", "answers"),
    )


def evaluate(cfg: DictConfig, run: Run, data_file: Path, data_report: dict[str, Any]) -> None:
    """The stage's zsRE path: this shard's cases (unless aggregating), then the summary."""
    check_mode(cfg)
    loaded = load(cfg, data_file)
    index, count = int(cfg.shard.index), int(cfg.shard.count)
    if not cfg.aggregate_only:
        lm = run.load_model()
        if cfg.editor.name != "none":  # the key statistics' metadata, for W&B lineage
            run.uses(Path(cfg.paths.results) / "stats" / cfg.model.name / cfg.corpus.name, "stats")
        damage = record_texts(cfg, run, lm)
        run_cases(cfg, run, lm, take_shard(loaded.records, index, count), f"{index}of{count}")
        if damage is not None and index == 0:  # the first cases' edits, as CounterFact's runs
            independent_perplexity(cfg, run, lm, loaded, damage)
        if count > 1:
            print(
                f"shard {index} of {count} done; when all are, combine them with\n"
                f"  python -m pipeline.merge {run.out_dir}"
            )
            return
    summarize(cfg, run, loaded, {**loaded.report(), **data_report})


def scored(correct: dict[str, list[list[bool]]]) -> dict[str, Any]:
    return {"correct": correct, "metrics": zm.case_metrics(correct)}


def case_record(
    case: ZsreCase, pre: dict, post: dict, result: EditResult | None, seconds: float
) -> dict[str, Any]:
    record = {
        "id": case.id,
        "subject": case.subject,
        "prompt": case.prompt,
        "target_new": case.target_new,
        "neighborhood_answer": case.neighborhood_answer,
        "pre": pre,
        "post": post,
        "seconds": round(seconds, 3),
    }
    if result is not None:
        record["edit"] = edit_summary(result)
    return record


def run_cases(
    cfg: DictConfig, run: Run, lm: LoadedModel, cases: Sequence[ZsreCase], tag: str
) -> None:
    """Edit and score the cases not yet in the run's files, a batch at a time."""
    finished = {r["id"] for r in read_jsonl(sorted(run.out_dir.glob(CASES_GLOB)))}
    todo = [c for c in cases if c.id not in finished]
    log.info(
        "%d zsRE cases in this shard, %d already evaluated", len(cases), len(cases) - len(todo)
    )
    if not todo:
        return
    editor = CaseEditor(cfg, lm)
    rows_per_pass, size = int(cfg.eval.rows_per_pass), int(cfg.eval.cases_per_batch)
    bar = tqdm(total=len(todo), desc=f"zsRE {editor.name}", unit="case")
    for start in range(0, len(todo), size):
        batch = todo[start : start + size]
        started = time.perf_counter()
        results = editor.updates(batch)
        pre = [scored(c) for c in score_zsre_cases(lm, batch, batch_size=rows_per_pass)]
        updates = [update_of(r) for r in results]
        post = (
            [scored(c) for c in score_zsre_cases(lm, batch, updates, batch_size=rows_per_pass)]
            if any(u is not None for u in updates)
            else pre
        )
        seconds = (time.perf_counter() - started) / len(batch)
        lines = [
            case_record(c, p, q, r, seconds)
            for c, p, q, r in zip(batch, pre, post, results, strict=True)
        ]
        append_jsonl(run.path(f"zsre-cases-{tag}.jsonl"), lines)
        run.tracker.log({"progress/seconds_per_case": seconds})
        bar.update(len(batch))
    bar.close()


def summarize_records(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Efficacy, paraphrase, specificity over the records, before and after the edit."""
    return {
        "benchmark": "zsre",
        "n_cases": len(records),
        **{
            phase: zm.summarize([r[phase]["metrics"] for r in records]) for phase in ("pre", "post")
        },
    }


def headline(summary: dict[str, Any]) -> str:
    def row(phase: str) -> str:
        return " ".join(f"{k}={summary[phase][k]['mean']:.1f}" for k in zm.METRICS)

    return f"zsRE pre:  {row('pre')}\nzsRE post: {row('post')}  (n={summary['n_cases']})"


def summarize(cfg: DictConfig, run: Run, loaded: Loaded, data_report: dict[str, Any]) -> None:
    """`summary.json` over every case's line in the run's zsRE files."""
    records = {r["id"]: r for r in read_jsonl(sorted(run.out_dir.glob(CASES_GLOB)))}
    wanted = [c.id for c in loaded.records]
    done, completeness = finished_records(cfg, records, wanted, set(records))
    if not done:
        raise SystemExit("no evaluated zsRE cases to summarize")
    summary = summarize_records(done)
    if run.path("perplexity.json").exists():  # the damage, over the first cases (its note)
        summary["perplexity"] = files.read_json(run.path("perplexity.json"))
    summary.update(
        {
            "model": cfg.model.name,
            "editor": cfg.editor.name,
            "data": data_report,
            "target": cfg.data.get("target", "answers"),
            **completeness,
        }
    )
    run.write_summary(summary)
    print(headline(summary))
