"""Known-fact candidates drawn from CounterFact's true facts, kept apart from the edited cases.

Derived data. Before the edit, every CounterFact case states a true fact: its subject, the
relation's prompt and `target_true`. EasyEdit's copy (`counterfact_easyedit/counterfact-{edit,
train,val}.json`, all 21,919 cases) holds them with the prompt filled in. This module turns them
into records of `known_1000.json`'s schema, so the `known` stage decides which ones the model
knows by the same rule and code as for ROME's known facts (the greedy answer is the true target,
`pipeline.core.recall`):

    known_id = case_id   subject   attribute = target_true   prompt (filled, as EasyEdit has it)
    template = prompt with the subject replaced by "{}"      relation_id (below, or null)

Kept apart from the evaluation: the reference runs edit CounterFact's first 1,000 records
(`counterfact-first1000`, case_ids 0..1085 less the Hugging Face test split's). Those case_ids
are left out, and so is every other case stating the same (subject, relation) as one of them
(matched by relation_id and by template), since an edit of that fact is what the evaluation
makes. Then one case per (subject, relation) is kept: the lowest case_id (CounterFact restates
some facts under several case_ids, with different counterfactual targets).

Relations: EasyEdit's copy has no relation_id. A case takes it from its own record in the
full-schema subset `counterfact_full/multi_counterfact_identical2_all_1386.json` where that has
it; else from its template, where every full-schema record (that subset, the first 1,000, and
`known_1000.json`) that uses the template names one relation; else null (18 templates, such as
"{} is located in", serve several relations). De-duplication keys on relation_id where known and
on the template otherwise, so two cases of one relation under different ambiguous templates
can both stay.

The file goes to `<cache>/data/`, named by a digest of the sources' sha256s, with a sidecar
recording `derived: true`, its sha256, the sources' and the counts of each step. Built at load
time when missing (`pipeline.data.sources.resolve_data_file`), or with

    python -m pipeline.data.counterfact_known [--root $ROME_DATA] [--cache .cache]
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from pipeline.data import counterfact_join, derived

NAME = "counterfact-known"
FULL_SUBSET = "counterfact_full/multi_counterfact_identical2_all_1386.json"
KNOWN_1000 = "known_1000.json"
SOURCES = (*counterfact_join.SOURCES, FULL_SUBSET, KNOWN_1000)


def missing_sources(data_root: str | Path) -> list[str]:
    return [name for name in SOURCES if not (Path(data_root) / name).exists()]


def template_of(prompt: str, subject: str) -> str:
    """The relation's prompt: the subject's last occurrence replaced by "{}"."""
    at = prompt.rfind(subject)
    if at < 0:
        raise ValueError(f"subject {subject!r} is not in the prompt {prompt!r}")
    return prompt[:at] + "{}" + prompt[at + len(subject) :]


def template_relations(pairs: Iterable[tuple[str, str]]) -> dict[str, str]:
    """template -> relation_id, for the templates that every given (template, relation) pair
    using them ties to the same relation (ambiguous templates are left out)."""
    seen: dict[str, set[str]] = {}
    for template, relation in pairs:
        seen.setdefault(template, set()).add(relation)
    return {template: next(iter(ids)) for template, ids in seen.items() if len(ids) == 1}


def candidates(
    cases: Sequence[Mapping[str, Any]],
    evaluated: Sequence[Mapping[str, Any]],
    by_case: Mapping[int, str],
    by_template: Mapping[str, str],
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Known-fact records from EasyEdit-schema `cases`, less the `evaluated` ROME-schema cases
    and their (subject, relation)s, one per (subject, relation); and the counts of each step.

    `by_case` (case_id -> relation_id) wins over `by_template` (template -> relation_id)."""
    excluded_ids = {int(case["case_id"]) for case in evaluated}
    excluded_keys = set()
    for case in evaluated:
        rewrite = case["requested_rewrite"]
        excluded_keys.add((rewrite["subject"], rewrite["prompt"]))
        if rewrite.get("relation_id"):
            excluded_keys.add((rewrite["subject"], rewrite["relation_id"]))
    counts = Counter(cases=len(cases))
    kept: dict[tuple[str, str], dict[str, Any]] = {}
    for case in sorted(cases, key=lambda c: int(c["case_id"])):
        case_id, subject, prompt = int(case["case_id"]), case["subject"], case["prompt"]
        template = template_of(prompt, subject)
        relation = by_case.get(case_id) or by_template.get(template)
        if case_id in excluded_ids:
            counts["evaluated"] += 1
            continue
        if (subject, template) in excluded_keys or (subject, relation) in excluded_keys:
            counts["same_fact_as_evaluated"] += 1
            continue
        key = (subject, relation or template)
        if key in kept:
            counts["duplicate"] += 1
            continue
        kept[key] = {
            "known_id": case_id,
            "case_id": case_id,
            "subject": subject,
            "attribute": case["ground_truth"],
            "template": template,
            "prompt": prompt,
            "relation_id": relation,
        }
    records = list(kept.values())
    counts["kept"] = len(records)
    counts["no_relation_id"] = sum(r["relation_id"] is None for r in records)
    return records, dict(counts)


def draw(data_root: str | Path) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """The candidates from the data root's files (see the module docstring)."""
    root = Path(data_root)
    absent = missing_sources(root)
    if absent:
        raise FileNotFoundError(f"cannot build {NAME}: missing in {root}: {', '.join(absent)}")
    cases = []
    for name in counterfact_join.EASYEDIT:
        cases += json.loads((root / name).read_text(encoding="utf-8"))
    evaluated = counterfact_join.join(root)
    subset = json.loads((root / FULL_SUBSET).read_text(encoding="utf-8"))
    known = json.loads((root / KNOWN_1000).read_text(encoding="utf-8"))
    by_case = {int(r["case_id"]): r["requested_rewrite"]["relation_id"] for r in subset}
    pairs = [
        (r["requested_rewrite"]["prompt"], r["requested_rewrite"]["relation_id"])
        for r in (*subset, *evaluated)
    ] + [(r["template"], r["relation_id"]) for r in known]
    return candidates(cases, evaluated, by_case, template_relations(pairs))


def source_digests(data_root: str | Path) -> dict[str, str]:
    return derived.source_digests(data_root, SOURCES)


def target_path(cache_dir: str | Path, digests: dict[str, str]) -> Path:
    return derived.target_path(cache_dir, NAME, digests)


def build(data_root: str | Path, cache_dir: str | Path) -> Path:
    """The candidates' file in the cache, built if missing or damaged; returns its path."""

    def make(root: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        records, counts = draw(root)
        return records, {"counts": counts}

    return derived.build(
        NAME,
        data_root,
        cache_dir,
        SOURCES,
        make,
        "pipeline.data.counterfact_known: CounterFact's true facts (EasyEdit's copy) in "
        "known_1000's schema, less the first 1,000 records' case_ids and (subject, relation)s, "
        "one per (subject, relation)",
    )


def main(argv: list[str] | None = None) -> int:
    return derived.main(build, __doc__, argv)


if __name__ == "__main__":
    raise SystemExit(main())
