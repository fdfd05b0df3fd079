"""A tuning split of CounterFact that shares no case and no subject with the scored cases.

Hyperparameters chosen on the cases a table scores would flatter the tuned editors. The split:
EasyEdit's `counterfact-val.json` (1,919 cases in the reduced schema: one paraphrase, one
neighbour; SOURCES.md 2) in its file order, less every case whose case_id or subject occurs in
the cases the reference results score: CounterFact's first 1,000 records (`first1000_parts`,
whose subjects are in `triples.jsonl`) and the 1,386 cases of `multi_counterfact_identical2`
(the mass and sequential runs' extra cases). Derived into the cache as every derived file is
(`pipeline.data.derived`); `data=counterfact-tune` reads it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.data import derived

NAME = "counterfact-tune"
VAL = "counterfact_easyedit/counterfact-val.json"
FIRST1000_TRIPLES = "counterfact_full/first1000_parts/triples.jsonl"
MCF = "counterfact_full/multi_counterfact_identical2_all_1386.json"
SOURCES = (VAL, FIRST1000_TRIPLES, MCF)


def missing_sources(data_root: str | Path) -> list[str]:
    return [name for name in SOURCES if not (Path(data_root) / name).exists()]


def scored_cases(data_root: Path) -> tuple[set[int], set[str]]:
    """The case_ids and subjects of every case the reference results score."""
    subjects = {
        json.loads(line)["subject"]
        for line in (data_root / FIRST1000_TRIPLES).read_text(encoding="utf-8").splitlines()
        if line
    }
    # The first 1,000 records carry case_ids within 0-1085 (SOURCES.md 5b): all of them are left
    # out, which also drops the few val cases among those ids, and needs no join.
    ids = set(range(1086))
    for case in json.loads((data_root / MCF).read_text(encoding="utf-8")):
        ids.add(int(case["case_id"]))
        subjects.add(case["requested_rewrite"]["subject"])
    return ids, subjects


def split(data_root: str | Path) -> list[dict[str, Any]]:
    root = Path(data_root)
    ids, subjects = scored_cases(root)
    val = json.loads((root / VAL).read_text(encoding="utf-8"))
    return [r for r in val if int(r["case_id"]) not in ids and r["subject"] not in subjects]


def build(data_root: str | Path, cache_dir: str | Path) -> Path:
    return derived.build(
        NAME,
        data_root,
        cache_dir,
        SOURCES,
        split,
        "pipeline.data.counterfact_tune: EasyEdit's val split less every case whose case_id or "
        "subject is among the scored cases (the first 1,000 and the 1,386 identical2 cases)",
    )
