"""Every CounterFact case in ROME's full schema that can be had here: 2,328 distinct cases.

AlphaEdit's setting (Fang et al. 2025, Table 1) edits 2,000 cases in sequence; neither
full-schema source has that many. The union: the joined first 1,000 records
(`pipeline.data.counterfact_join`, case_ids 0-1085) in their order, then the cases of
`multi_counterfact_identical2_all_1386.json` whose case_id is not among them (1,328; the 58
shared cases are identical in both, tests/test_counterfact_union.py), in that file's order. NOT a
random sample: its second part holds the subjects that occur twice in MEMIT's multi_counterfact,
each edited on two relations, so a run past the first 1,000 edits meets every such subject twice.
Derived into the cache as every derived file is (`pipeline.data.derived`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.data import counterfact_join, derived

NAME = "counterfact-union"
MCF = "counterfact_full/multi_counterfact_identical2_all_1386.json"
SOURCES = (*counterfact_join.SOURCES, MCF)


def missing_sources(data_root: str | Path) -> list[str]:
    return [name for name in SOURCES if not (Path(data_root) / name).exists()]


def union(data_root: str | Path) -> list[dict[str, Any]]:
    root = Path(data_root)
    first = counterfact_join.join(root)
    seen = {case["case_id"] for case in first}
    more = json.loads((root / MCF).read_text(encoding="utf-8"))
    return first + [case for case in more if case["case_id"] not in seen]


def build(data_root: str | Path, cache_dir: str | Path) -> Path:
    return derived.build(
        NAME,
        data_root,
        cache_dir,
        SOURCES,
        union,
        "pipeline.data.counterfact_union: the joined first 1,000 records, then the 1,386 "
        "identical2 file's cases not among them, in file order",
    )
