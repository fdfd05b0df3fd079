"""Stage `evaluate`: edit CounterFact cases and score them with the paper's metrics (zsRE:
`data=zsre`, ROME's zsRE protocol, in `pipeline.app.zsre`).

    python -m pipeline.evaluate [model=...] [data=counterfact-easyedit] [editor=rome|memit|...|none]
                                [data.limit=200] [eval.cases_per_batch=8] [shard.index=i shard.count=n]
    python -m pipeline.evaluate eval.mode=sequential data.limit=100   # edits accumulate
    python -m pipeline.merge results/evaluate/<model>/<data>/<editor>   # after sharded runs

The config read, one protocol called, the results summarised: the protocols (independent, mass,
sequential) live in `pipeline.app.protocols`. `summary.json` has every metric with its 95%
interval and n, before ("pre") and after ("post").

Damage to the model (`eval.perplexity`, `pipeline.app.damage`): perplexity on the held-out text
the key statistics never read, the unedited model's (cached) beside the edited model's: in mass
mode at each size (after the joint edit), in sequential mode at each checkpoint, in independent
mode over the first `eval.perplexity_cases` cases, each case's edit alone on the unedited model,
averaged window by window (`perplexity.json`; the interval is over the text's windows). run.json
records the statistics' text and the perplexity text (files, sha256, tokens).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from pipeline.app import zsre
from pipeline.app.damage import record_texts
from pipeline.app.protocols import (
    PROTOCOLS,
    generation_ids,
    independent_perplexity,
    run_independent,
    shard_of,
    write_protocol_summary,
)
from pipeline.app.results import headline, read_jsonl, summarize_records
from pipeline.app.stage import Run, finished_records, stage
from pipeline.core import files
from pipeline.data.records import CounterfactCase, load_counterfact, take_shard
from pipeline.data.sources import derived_provenance, resolve_data_file

log = logging.getLogger(__name__)


@stage("evaluate", resumable=True)
def main(cfg: DictConfig, run: Run) -> None:
    if cfg.data.kind == "zsre":
        zsre.check_mode(cfg)
    elif cfg.data.kind != "counterfact":
        raise ValueError(f"evaluate reads CounterFact or zsRE data, not kind {cfg.data.kind!r}")
    data_file, origin = resolve_data_file(cfg.data, cfg.paths.data, cfg.paths.cache)
    provenance = derived_provenance(data_file)  # a derived file: its sources' digests
    digest = run.check_data(data_file, **provenance)["sha256"]  # a resume must see the same records
    if cfg.data.kind == "zsre":
        zsre.evaluate(cfg, run, data_file, {"origin": origin, "sha256": digest, **provenance})
        return
    loaded = load_counterfact(data_file, on_error=cfg.data.on_error, limit=cfg.data.limit)
    cases: list[CounterfactCase] = loaded.records
    index, count = int(cfg.shard.index), int(cfg.shard.count)
    if cfg.eval.mode in PROTOCOLS:  # one job each (the config schema refuses shards)
        if cfg.aggregate_only:  # `pipeline.merge`: the summary again, from the files on disk
            write_protocol_summary(cfg, run, cfg.eval.mode, loaded.report())
            return
        lm = run.load_model()
        uses_statistics(cfg, run)
        PROTOCOLS[cfg.eval.mode](cfg, run, lm, loaded, record_texts(cfg, run, lm))
        return
    if cfg.eval.mode != "independent":
        raise ValueError(
            f"eval.mode must be independent, mass or sequential, got {cfg.eval.mode!r}"
        )
    if not cfg.aggregate_only:
        lm = run.load_model()
        uses_statistics(cfg, run)
        damage = record_texts(cfg, run, lm)
        mine = take_shard(cases, index, count)
        generated = generation_ids(cfg, cases)
        run_independent(
            cfg, run, lm, shard_of(loaded, mine), f"{index}of{count}", data_file, generated
        )
        if damage is not None and index == 0:
            independent_perplexity(cfg, run, lm, loaded, damage)
        if count > 1:
            print(
                f"shard {index} of {count} done; when all are, combine them with\n"
                f"  python -m pipeline.merge {run.out_dir}"
            )
            return
    report = {**loaded.report(), "origin": origin, "sha256": digest, **provenance}
    summarize_run(cfg, run, cases, report, loaded.schema)


def uses_statistics(cfg: DictConfig, run: Run) -> None:
    """The key statistics' metadata, for W&B lineage."""
    if cfg.editor.name != "none":
        run.uses(Path(cfg.paths.results) / "stats" / cfg.model.name / cfg.corpus.name, "stats")


def summarize_run(
    cfg: DictConfig,
    run: Run,
    cases: Sequence[CounterfactCase],
    data_report: dict[str, Any],
    schema: str,
) -> None:
    """`summary.json` and the W&B summary over every case's line in the run's JSONL files."""
    records = {r["id"]: r for r in read_jsonl(sorted(run.out_dir.glob("cases-*.jsonl")))}
    # Cases the shards found too long for the model: bad records, counted with the others.
    too_long = {r["id"]: r for r in read_jsonl(sorted(run.out_dir.glob("skipped-*.jsonl")))}
    if too_long:
        listed = [*data_report["skipped_records"], *too_long.values()]
        data_report = {
            **data_report,
            "loaded": data_report["loaded"] - len(too_long),
            "skipped": data_report["skipped"] + len(too_long),
            "skipped_records": sorted(listed, key=lambda r: r["index"])[:100],
        }
    wanted = [c.id for c in cases]
    done, completeness = finished_records(cfg, records, wanted, records.keys() | too_long.keys())
    if not done:
        raise SystemExit("no evaluated cases to summarize")
    summary = summarize_records(done, seed=int(cfg.seed))
    if run.path("perplexity.json").exists():  # the damage, over the first cases (its note)
        summary["perplexity"] = files.read_json(run.path("perplexity.json"))
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
    if cfg.model.get("source") == "random":
        print(RANDOM_MODEL_NOTE.format(model=cfg.model.name))


RANDOM_MODEL_NOTE = (
    "note: {model} is a random test model: the run shows the pipeline's plumbing, not editing "
    "(edits can be made, `ok`, while ES does not move: the model knows no facts to rewrite)"
)


if __name__ == "__main__":
    main()
