"""ROME's known facts and CounterFact's known-fact candidates in one file: about a thousand facts
the default model knows, traced in one run (one noise scale, one set of averages).

Derived data. `known_1000.json`'s 1,209 records keep their known_id (0-1208) and come first,
so the file's first records are the bundled known_1000 sample. Then the candidates of
`pipeline.data.counterfact_known` (CounterFact's true facts less the evaluated cases), less
every candidate stating a fact known_1000 states, matched as that module matches facts: the same
subject and relation_id, or the same subject and template. A candidate's known_id is
`CASE_OFFSET + case_id` (its `case_id` stays beside it), so the two id ranges never meet and a
per-prompt file's name still says which CounterFact case it traced.

On the shared data root SmolLM2 knows 279 of known_1000 and 814 of the candidates; the union
holds both sets less the facts both state (the `known` stage counts them).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pipeline.data import counterfact_known, derived

NAME = "known-union"
SOURCES = counterfact_known.SOURCES  # known_1000.json is among them
CASE_OFFSET = 100_000  # above any known_1000 id (0-1208) and any CounterFact case_id (< 22,000)


def missing_sources(data_root: str | Path) -> list[str]:
    return counterfact_known.missing_sources(data_root)


def union(
    known: Sequence[Mapping[str, Any]], candidates: Sequence[Mapping[str, Any]]
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """known_1000's records, then the candidates stating no fact among them (renumbered); and
    the counts of each part."""
    facts = set()
    for record in known:
        facts.add((record["subject"], record["template"]))
        if record.get("relation_id"):
            facts.add((record["subject"], record["relation_id"]))
    counts = Counter(known_1000=len(known), candidates=len(candidates))
    records = [dict(record) for record in known]
    for candidate in candidates:
        subject, relation = candidate["subject"], candidate.get("relation_id")
        if (subject, candidate["template"]) in facts or (relation and (subject, relation) in facts):
            counts["same_fact_as_known_1000"] += 1
            continue
        records.append({**candidate, "known_id": CASE_OFFSET + int(candidate["case_id"])})
    counts["kept"] = len(records)
    return records, dict(counts)


def draw(data_root: str | Path) -> tuple[list[dict[str, Any]], dict[str, int]]:
    root = Path(data_root)
    known = json.loads((root / counterfact_known.KNOWN_1000).read_text(encoding="utf-8"))
    candidates, _ = counterfact_known.draw(root)
    return union(known, candidates)


def build(data_root: str | Path, cache_dir: str | Path) -> Path:
    """The union's file in the cache, built if missing or damaged; returns its path."""

    def make(root: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        records, counts = draw(root)
        return records, {"counts": counts}

    return derived.build(
        NAME,
        data_root,
        cache_dir,
        SOURCES,
        make,
        "pipeline.data.known_union: known_1000.json's records, then counterfact-known's "
        f"candidates stating no fact among them, known_id = {CASE_OFFSET} + case_id",
    )


def main(argv: list[str] | None = None) -> int:
    return derived.main(build, __doc__, argv)


if __name__ == "__main__":
    raise SystemExit(main())
