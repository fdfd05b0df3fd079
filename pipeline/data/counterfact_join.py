"""CounterFact's first 1,000 records in ROME's full schema, joined from two partial copies.

Derived data (SOURCES.md 5b). `counterfact_full/first1000_parts/` holds every prompt family of
the first 1,000 records of the Hugging Face copy of CounterFact, in record order, but no case_id
and no prompt template; EasyEdit's copy (`counterfact_easyedit/counterfact-{edit,train,val}.json`,
21,919 records in all) has case_id and the filled rewrite prompt but one paraphrase and one
neighbour. The join, record i of the part files:

    triples.jsonl        line i:             subject, relation (relation_id), object (target_true)
    edits.jsonl          line i:             target_new_object, the first generation prompt
    aligned_facts.jsonl  lines 20i .. 20i+19: 10 neighborhood, then 10 attribute prompts
    distractors.jsonl    lines 12i .. 12i+11: 10 generation, then 2 paraphrase prompts

    (subject, target_true, target_new) -> exactly one EasyEdit record -> case_id, filled prompt
    template = the filled prompt with the subject's (only) occurrence replaced by "{}"

Every line's category and subject are checked against its place; a triple with no EasyEdit
record or with several is an error naming the record. What is not in either copy stays out:
pararel_idx and the Wikidata ids of the targets (`target_new.id`, which keys ROME's attribute
snippets for RS).

The joined file goes to the cache as every derived file does (`pipeline.data.derived`: named
by its sources' sha256s, with a sidecar recording its own). Built at load time when missing
(`pipeline.data.sources.resolve_data_file`), or with

    python -m pipeline.data.counterfact_join [--root $ROME_DATA] [--cache .cache]
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.data import derived

NAME = "counterfact-first1000"
PARTS_DIR = "counterfact_full/first1000_parts"
PARTS = ("triples.jsonl", "edits.jsonl", "aligned_facts.jsonl", "distractors.jsonl")
EASYEDIT = tuple(
    f"counterfact_easyedit/counterfact-{split}.json" for split in ("edit", "train", "val")
)
SOURCES = (*(f"{PARTS_DIR}/{name}" for name in PARTS), *EASYEDIT)
# Lines per record in the two prompt files, in the order the families follow each other.
ALIGNED = (("neighborhood", 10), ("attribute", 10))
DISTRACTORS = (("generation", 10), ("paraphrase", 2))


class JoinError(ValueError):
    """A record of the part files that cannot be joined, named by its position."""

    def __init__(self, record: int, subject: str | None, reason: str):
        super().__init__(f"{PARTS_DIR}: record {record} (subject {subject!r}): {reason}")


def missing_sources(data_root: str | Path) -> list[str]:
    return [name for name in SOURCES if not (Path(data_root) / name).exists()]


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def _families(
    lines: list[dict[str, Any]], record: int, subject: str, layout: tuple, subject_key: str
) -> dict[str, list[str]]:
    """The prompt families of `record` from a file holding `layout` lines per record."""
    width = sum(count for _, count in layout)
    mine = lines[record * width : (record + 1) * width]
    if len(mine) != width:
        raise JoinError(record, subject, f"only {len(mine)} of its {width} prompt lines")
    out: dict[str, list[str]] = {}
    for family, count in layout:
        chunk, mine = mine[:count], mine[count:]
        for line in chunk:
            if line.get("category") != family or line.get(subject_key) != subject:
                raise JoinError(
                    record,
                    subject,
                    f"a {family} prompt line is {line.get('category')!r} about "
                    f"{line.get(subject_key)!r}: the part files are not in record order",
                )
        out[family] = [line["prompt"] for line in chunk]
    return out


def join(data_root: str | Path) -> list[dict[str, Any]]:
    """The first 1,000 CounterFact records in ROME's schema (see the module docstring)."""
    root = Path(data_root)
    absent = missing_sources(root)
    if absent:
        raise FileNotFoundError(f"cannot join {NAME}: missing in {root}: {', '.join(absent)}")
    triples, edits, aligned, distractors = (_lines(root / PARTS_DIR / name) for name in PARTS)
    if len(triples) != len(edits):
        raise ValueError(f"{PARTS_DIR}: {len(triples)} triples but {len(edits)} edits")
    easyedit: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for name in EASYEDIT:
        for record in json.loads((root / name).read_text(encoding="utf-8")):
            key = (record["subject"], record["ground_truth"], record["target_new"])
            easyedit.setdefault(key, []).append(record)
    joined = []
    for i, (triple, edit) in enumerate(zip(triples, edits, strict=True)):
        subject, target_true = triple["subject"], triple["object"]
        target_new = edit["target_new_object"]
        if edit["original"] != {k: triple[k] for k in ("subject", "relation", "object")}:
            raise JoinError(i, subject, f"edits.jsonl line {i} is about {edit['original']}")
        matches = easyedit.get((subject, target_true, target_new), [])
        if len(matches) != 1:
            ids = [m["case_id"] for m in matches]
            raise JoinError(
                i,
                subject,
                f"(subject, target_true {target_true!r}, target_new {target_new!r}) matches "
                f"{len(matches)} EasyEdit records{f' (case_ids {ids})' if ids else ''}; "
                "exactly one is needed",
            )
        match = matches[0]
        prompt = match["prompt"]
        if prompt.count(subject) != 1:
            raise JoinError(
                i, subject, f"the subject occurs {prompt.count(subject)} times in {prompt!r}"
            )
        families = _families(aligned, i, subject, ALIGNED, "related_to_subject")
        families |= _families(distractors, i, subject, DISTRACTORS, "subject")
        if families["generation"][0] != edit["prompt"]:
            raise JoinError(i, subject, "its first generation prompt differs from edits.jsonl's")
        joined.append(
            {
                "case_id": match["case_id"],
                "requested_rewrite": {
                    "prompt": prompt.replace(subject, "{}"),
                    "subject": subject,
                    "target_new": {"str": target_new},
                    "target_true": {"str": target_true},
                    "relation_id": triple["relation"],
                },
                "paraphrase_prompts": families["paraphrase"],
                "neighborhood_prompts": families["neighborhood"],
                "attribute_prompts": families["attribute"],
                "generation_prompts": families["generation"],
            }
        )
    return joined


def source_digests(data_root: str | Path) -> dict[str, str]:
    return derived.source_digests(data_root, SOURCES)


def target_path(cache_dir: str | Path, digests: dict[str, str]) -> Path:
    return derived.target_path(cache_dir, NAME, digests)


def build(data_root: str | Path, cache_dir: str | Path) -> Path:
    """The joined file in the cache, built if missing or damaged; returns its path."""
    return derived.build(
        NAME,
        data_root,
        cache_dir,
        SOURCES,
        join,
        "pipeline.data.counterfact_join: the part files' prompt families joined with EasyEdit's "
        "copy by (subject, target_true, target_new), one match each (SOURCES.md 5b)",
    )


def main(argv: list[str] | None = None) -> int:
    return derived.main(build, __doc__, argv)


if __name__ == "__main__":
    raise SystemExit(main())
