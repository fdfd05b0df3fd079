"""Stage `known`: which facts does the model know?

    python -m pipeline.known [model=...] [data=known] [batch_size=16]

Writes `known.json` (the facts the model knows, with its answer probabilities), `recall.jsonl`
(every fact's outcome) and `summary.json` (total, known, first-token known, skipped, and per
relation the facts checked and known) under `${paths.results}/known/<model>/<data>/`. The
tracing stage starts from `known.json`.

`data=known` is ROME's 1,209 known facts; `data=counterfact-known` draws candidates from
CounterFact's true facts, less the cases the evaluation edits (`pipeline.data.counterfact_known`).
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from typing import Any

from omegaconf import DictConfig

from pipeline.app.stage import Run, stage
from pipeline.core import files
from pipeline.core.recall import check_known, too_long
from pipeline.data.records import load_known
from pipeline.data.sources import derived_provenance, resolve_data_file

log = logging.getLogger(__name__)


@stage("known")
def main(cfg: DictConfig, run: Run) -> None:
    path, origin = resolve_data_file(cfg.data, cfg.paths.data, cfg.paths.cache)
    provenance = derived_provenance(path)  # a derived file: its sources' digests
    digest = run.check_data(path, **provenance)["sha256"]
    loaded = load_known(path, on_error=cfg.data.on_error, limit=cfg.data.limit)
    lm = run.load_model()
    for error in loaded.reject(lambda fact: too_long(lm, fact), cfg.data.on_error):
        log.warning("skipped a bad record: %s", error)
    recalls = check_known(lm, loaded.records, batch_size=int(cfg.batch_size))
    rows = [
        {
            **recall.fact.to_dict(),
            "answer": lm.tokenizer.decode(list(recall.answer_ids)),
            "answer_ids": list(recall.answer_ids),
            "prediction": lm.tokenizer.decode([recall.predicted_ids[0]]),
            "first_token_prob": recall.first_token_prob,
            "answer_prob": recall.answer_prob,
            "known": recall.known,
            "first_token_known": recall.first_token_known,
        }
        for recall in recalls
    ]
    known = [row for row in rows if row["known"]]
    run.write_json("known.json", known)
    files.atomic_write(run.path("recall.jsonl"), "".join(json.dumps(row) + "\n" for row in rows))
    summary = {
        "model": cfg.model.name,
        "data": {**loaded.report(), "origin": origin, "sha256": digest, **provenance},
        "total": loaded.total,
        "checked": len(rows),
        "known": len(known),
        "first_token_known": sum(row["first_token_known"] for row in rows),
        "unknown": len(rows) - len(known),
        "skipped": len(loaded.skipped),
        "by_relation": by_relation(rows),
    }
    run.write_summary(summary)
    run.tracker.table(
        "known_facts",
        ["id", "subject", "prompt", "answer", "first_token_prob", "answer_prob"],
        [
            [
                r["id"],
                r["subject"],
                r["prompt"],
                r["answer"],
                r["first_token_prob"],
                r["answer_prob"],
            ]
            for r in known
        ],
    )
    print(
        f"{cfg.model.name} knows {len(known)} of {len(rows)} facts "
        f"({summary['first_token_known']} by the first token; {len(loaded.skipped)} records skipped)"
    )
    print(
        "by relation (known / checked): "
        + ", ".join(
            f"{name} {counts['known']}/{counts['facts']}"
            for name, counts in summary["by_relation"].items()
        )
    )


def by_relation(rows: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """Per relation_id ("none" where the record has none): facts checked and facts known, the
    relations with most known facts first."""
    facts = Counter(row.get("relation_id") or "none" for row in rows)
    known = Counter(row.get("relation_id") or "none" for row in rows if row["known"])
    order = sorted(facts, key=lambda name: (-known[name], -facts[name], name))
    return {name: {"facts": facts[name], "known": known[name]} for name in order}


if __name__ == "__main__":
    main()
