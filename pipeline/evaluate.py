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

import json
import logging
import math
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig
from tqdm.auto import tqdm

from metrics import counterfact as cf
from metrics import generation as gen
from metrics.intervals import mean_ci
from pipeline.data import CounterfactCase, load_counterfact, missing_by_shard, take_shard
from pipeline.editor import context_templates, key_statistics, rome_hparams
from pipeline.evaluation import generate, score_cases
from pipeline.models import LoadedModel, file_lock
from pipeline.rome import (
    EditRequest,
    EditResult,
    compute_updates,
    edit_sequentially,
    preserved_weights,
)
from pipeline.sources import resolve_data_file
from pipeline.stage import Run, require_complete, stage

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Append-only JSONL files: one complete line per finished case


def read_jsonl(paths: Sequence[Path]) -> list[dict[str, Any]]:
    """Every complete line of the files; a torn last line (a killed run) is ignored."""
    rows = []
    for path in paths:
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                log.warning("ignoring an incomplete line in %s", path)
    return rows


def append_jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = "".join(json.dumps(row) + "\n" for row in rows)
    with open(path, "a+b") as handle:
        handle.seek(0, os.SEEK_END)
        if handle.tell() > 0:  # a torn last line from a killed run: start a fresh line
            handle.seek(-1, os.SEEK_END)
            if handle.read(1) != b"\n":
                handle.write(b"\n")
        handle.write(data.encode())
        handle.flush()
        os.fsync(handle.fileno())


def batches(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


# --------------------------------------------------------------------------------------------
# The editor


class Editor:
    """Updates for cases under the configured editor (`none` gives no updates)."""

    def __init__(self, cfg: DictConfig, lm: LoadedModel):
        self.name = cfg.editor.name
        self.lm = lm
        if self.name == "none":
            return
        self.hparams = rome_hparams(cfg.editor, lm.name)
        self.second_moment = key_statistics(cfg, lm, self.hparams.layer)
        self.templates = context_templates(cfg.paths.cache, lm, self.hparams)

    def requests(self, cases: Sequence[CounterfactCase]) -> list[EditRequest]:
        return [
            EditRequest(c.template, c.subject, c.target_new, target_true=c.target_true, id=c.id)
            for c in cases
        ]

    def updates(self, cases: Sequence[CounterfactCase]) -> list[EditResult | None]:
        if self.name == "none":
            return [None] * len(cases)
        return compute_updates(
            self.lm,
            self.requests(cases),
            self.hparams,
            second_moment=self.second_moment,
            context_templates=self.templates,
            batch_size=len(cases),
        )


# --------------------------------------------------------------------------------------------
# Scoring


def case_record(
    case: CounterfactCase,
    pre: dict[str, Any],
    post: dict[str, Any],
    result: EditResult | None,
    seconds: float,
) -> dict[str, Any]:
    record = {
        "id": case.id,
        "subject": case.subject,
        "target_new": case.target_new,
        "target_true": case.target_true,
        "pre": pre,
        "post": post,
        "seconds": round(seconds, 3),
    }
    if result is not None:
        record["edit"] = {
            "ok": result.ok,
            "error": None if result.ok else result.error.reason,
            "steps": result.steps,
            "target_nll": result.target_nll,
            "update_norm": result.info.get("update_norm"),
        }
    return record


def scored(probs: dict[str, list[tuple[float, float]]]) -> dict[str, Any]:
    return {"probs": probs, "metrics": cf.case_metrics(probs)}


class PreCache:
    """Unedited scores per case id, shared by every editor's run of this model and data."""

    def __init__(self, directory: Path, tag: str):
        self.path = directory / f"pre-{tag}.jsonl"
        self.rows = {r["id"]: r for r in read_jsonl(sorted(directory.glob("pre-*.jsonl")))}

    def get(self, lm: LoadedModel, cases: Sequence[CounterfactCase], rows_per_pass: int) -> list:
        missing = [c for c in cases if c.id not in self.rows]
        if missing:
            fresh = score_cases(lm, missing, batch_size=rows_per_pass)
            new_rows = [{"id": c.id, **scored(p)} for c, p in zip(missing, fresh, strict=True)]
            with file_lock(self.path.with_suffix(".lock")):  # jobs of a sweep share the file
                append_jsonl(self.path, new_rows)
            self.rows.update({r["id"]: r for r in new_rows})
        return [{k: v for k, v in self.rows[c.id].items() if k != "id"} for c in cases]


def generation_metrics(
    lm: LoadedModel,
    cases: Sequence[CounterfactCase],
    results: Sequence[EditResult | None],
    cfg: DictConfig,
    references: Reference,
) -> list[dict[str, Any]]:
    """GE and RS per case from top-k samples of its generation prompts, under its update."""
    prompts, owners = [], []
    for index, case in enumerate(cases):
        prompts += case.generation_prompts
        owners += [index] * len(case.generation_prompts)
    updates = [_update(results[i]) for i in owners]
    texts = generate(
        lm,
        prompts,
        updates=updates,
        max_new_tokens=int(cfg.eval.max_new_tokens),
        top_k=int(cfg.eval.top_k),
        seed=int(cfg.seed) + int(cases[0].id),
    )
    out = []
    for index, case in enumerate(cases):
        mine = [t for t, owner in zip(texts, owners, strict=True) if owner == index]
        out.append(
            {
                "texts": mine,
                "GE": gen.fluency(mine),
                "RS": gen.consistency(references.tfidf, mine, references.texts_about(case)),
            }
        )
    return out


class Reference:
    """Reference text about each new target, and the tf-idf it is compared with (RS).

    ROME's files (`attribute_snippets.json`, `idf.npy`, `tfidf_vocab.json` in the data root) when
    present; otherwise the idf is fitted on the cases' prompts and the references are the other
    cases' prompts with the same new target (a weaker stand-in, reported as such).
    """

    def __init__(self, data_root: Path, cases: Sequence[CounterfactCase]):
        snippets, idf, vocab = (
            data_root / name for name in ("attribute_snippets.json", "idf.npy", "tfidf_vocab.json")
        )
        if snippets.exists() and idf.exists() and vocab.exists():
            self.source = "ROME attribute snippets and tf-idf"
            self.tfidf = gen.TfIdf(json.loads(vocab.read_text()), np.load(idf))
            self.snippets: dict[tuple[str, str], list[str]] = {}
            for entry in json.loads(snippets.read_text()):
                key = (entry["relation_id"], entry["target_id"])
                self.snippets.setdefault(key, []).extend(s["text"] for s in entry["samples"])
            return
        self.source = (
            "stand-in: idf fitted on the cases' prompts; other cases' prompts as references"
        )
        self.snippets = None
        documents = [p for c in cases for p in (c.prompt, *c.generation_prompts)]
        self.tfidf = gen.TfIdf.fit(documents)
        self.by_target: dict[str, list[tuple[int, str]]] = {}
        for case in cases:
            for prompt in (case.prompt, *case.paraphrase_prompts):
                self.by_target.setdefault(case.target_new, []).append(
                    (case.id, f"{prompt} {case.target_new}")
                )

    def texts_about(self, case: CounterfactCase) -> list[str]:
        if self.snippets is not None:
            return self.snippets.get((case.relation_id, case.target_new_id), [])
        return [text for owner, text in self.by_target.get(case.target_new, []) if owner != case.id]


def _update(result: EditResult | None):
    return result.update if result is not None and result.ok else None


# --------------------------------------------------------------------------------------------
# Summaries


def summarize_records(records: Sequence[dict[str, Any]], seed: int = 0) -> dict[str, Any]:
    out: dict[str, Any] = {"n_cases": len(records)}
    for phase in ("pre", "post"):
        out[phase] = cf.summarize([r[phase]["metrics"] for r in records], seed=seed)
        for name in ("GE", "RS"):
            values = [
                r[phase][name] for r in records if not math.isnan(r[phase].get(name, math.nan))
            ]
            if values:
                out[phase][name] = mean_ci(values)
                if name == "RS":
                    out[phase][name] = {
                        k: v * 100 if k != "n" else v for k, v in out[phase][name].items()
                    }
    edits = [r["edit"] for r in records if "edit" in r]
    if edits:
        out["edits"] = {
            "ok": sum(e["ok"] for e in edits),
            "failed": sum(not e["ok"] for e in edits),
            "errors": sorted({e["error"] for e in edits if e["error"]})[:20],
            "mean_steps": float(np.mean([e["steps"] for e in edits])),
        }
    out["seconds_per_case"] = float(np.mean([r["seconds"] for r in records])) if records else None
    return out


def headline(summary: dict[str, Any]) -> str:
    def row(phase):
        s = summary[phase]
        return " ".join(
            f"{k}={s[k]['mean']:.1f}" for k in ("S", "ES", "PS", "NS", "EM", "PM", "NM")
        )

    return f"pre:  {row('pre')}\npost: {row('post')}  (n={summary['n_cases']})"


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
    finished = {r["id"] for r in read_jsonl(sorted(run.out_dir.glob("cases-*.jsonl")))}
    todo = [c for c in cases if c.id not in finished]
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
        updates = [_update(r) for r in results]
        post_probs = score_cases(lm, batch, updates, batch_size=rows_per_pass)
        post = [scored(p) for p in post_probs]
        if with_generation:
            for phase, phase_updates in (("pre", [None] * len(batch)), ("post", results)):
                generated = generation_metrics(lm, batch, phase_updates, cfg, references)
                for target, extra in zip(pre if phase == "pre" else post, generated, strict=True):
                    target.update(extra)
        seconds = (time.perf_counter() - started) / len(batch)
        append_jsonl(
            run.path(f"cases-{tag}.jsonl"),
            [
                case_record(c, p, q, r, seconds)
                for c, p, q, r in zip(batch, pre, post, results, strict=True)
            ],
        )
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

    with preserved_weights(lm, [editor.hparams.layer]):
        edit_sequentially(
            lm,
            editor.requests(cases),
            editor.hparams,
            second_moment=editor.second_moment,
            context_templates=editor.templates,
            checkpoint_every=1,
            on_checkpoint=on_checkpoint,
        )
    run.write_summary(
        {"mode": "sequential", "model": cfg.model.name, "editor": editor.name, "checkpoints": curve}
    )


if __name__ == "__main__":
    main()
