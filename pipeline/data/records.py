"""Typed records for known facts, counterfactual cases and zsRE questions, and their loaders.

Whatever the file (ROME's `known_1000.json` / `counterfact.json`, or EasyEdit's reduced
CounterFact splits), CounterFact records come out in one internal form; zsRE records (MEND's
schema) come out as ROME's zsRE dataset builds its requests. A bad record raises a
`RecordError` naming the file, the record and the field, or, with `on_error="skip"`, is
counted in `Loaded.skipped` — never silently dropped.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Container, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

OnError = Literal["fail", "skip"]


class RecordError(ValueError):
    """A record that cannot be used, with where it came from."""

    def __init__(self, file: str, index: int, record_id: Any, field: str, reason: str):
        self.file, self.index, self.record_id, self.field, self.reason = (
            file,
            index,
            record_id,
            field,
            reason,
        )
        super().__init__(f"{file}: record {index} (id {record_id}): field '{field}': {reason}")

    def as_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "id": self.record_id,
            "field": self.field,
            "reason": self.reason,
        }


@dataclass(frozen=True)
class KnownFact:
    """A fact for causal tracing: `prompt` contains `subject`; the answer is `attribute`."""

    id: int
    subject: str
    prompt: str
    attribute: str
    relation_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "subject": self.subject,
            "prompt": self.prompt,
            "attribute": self.attribute,
            "relation_id": self.relation_id,
        }


@dataclass(frozen=True)
class CounterfactCase:
    """A counterfactual edit: make `template.format(subject)` continue with `target_new`.

    Prompts with "{}" are templates for the subject; paraphrase, neighborhood, attribute and
    generation prompts are complete prompts. Neighborhood prompts are about other subjects whose
    answer is `target_true` (so an edit should leave them alone).
    """

    id: int
    subject: str
    template: str
    target_true: str | None  # None: a request given without it (`load_requests`)
    target_new: str
    paraphrase_prompts: tuple[str, ...] = ()
    neighborhood_prompts: tuple[str, ...] = ()
    attribute_prompts: tuple[str, ...] = ()
    generation_prompts: tuple[str, ...] = ()
    relation_id: str | None = None
    target_new_id: str | None = None  # Wikidata id; keys ROME's attribute snippets (RS)
    schema: Literal["rome", "easyedit"] = "rome"

    @property
    def prompt(self) -> str:
        return self.template.replace("{}", self.subject)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "subject": self.subject,
            "template": self.template,
            "target_true": self.target_true,
            "target_new": self.target_new,
            "paraphrase_prompts": list(self.paraphrase_prompts),
            "neighborhood_prompts": list(self.neighborhood_prompts),
            "attribute_prompts": list(self.attribute_prompts),
            "generation_prompts": list(self.generation_prompts),
            "relation_id": self.relation_id,
            "target_new_id": self.target_new_id,
            "schema": self.schema,
        }


@dataclass(frozen=True)
class ZsreCase:
    """A zsRE question as ROME's and MEMIT's zsRE dataset (`dsets/zsre.py`) makes it a request:
    rewrite `template.format(subject)` (the question `src`) to answer `target_new`; the
    paraphrase is the rephrased question; the neighbourhood prompt is an unrelated Natural
    Questions question (`loc` + "?") whose answer `neighborhood_answer` (`loc_ans`) the edit
    should leave alone. There is no true answer to compare with (`target_true` is None): the
    metrics are the answer tokens' top-1 accuracy (`metrics.zsre`)."""

    id: int
    subject: str
    template: str
    target_new: str
    paraphrase_prompts: tuple[str, ...]
    neighborhood_prompt: str
    neighborhood_answer: str
    target_true: None = None

    @property
    def prompt(self) -> str:
        return self.template.replace("{}", self.subject)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "subject": self.subject,
            "template": self.template,
            "target_new": self.target_new,
            "paraphrase_prompts": list(self.paraphrase_prompts),
            "neighborhood_prompt": self.neighborhood_prompt,
            "neighborhood_answer": self.neighborhood_answer,
        }


@dataclass
class Loaded:
    """What a loader returns: the usable records and the ones it skipped (with reasons)."""

    path: str
    schema: str
    records: list = field(default_factory=list)
    skipped: list[RecordError] = field(default_factory=list)
    indices: list[int] = field(default_factory=list)  # each record's position in the file

    @property
    def total(self) -> int:
        return len(self.records) + len(self.skipped)

    def reject(
        self, check: Callable[[Any], tuple[str, str] | None], on_error: OnError
    ) -> list[RecordError]:
        """Move the records `check` finds unusable, as (field, reason), to `skipped` (or raise
        the first with on_error="fail"): checks that need more than the file, such as whether a
        prompt fits a model's context. Returns the newly rejected."""
        kept, indices, rejected = [], [], []
        for record, index in zip(self.records, self.indices, strict=True):
            found = check(record)
            if found is None:
                kept.append(record)
                indices.append(index)
                continue
            error = RecordError(self.path, index, record.id, *found)
            if on_error == "fail":
                raise error
            rejected.append(error)
        self.records, self.indices = kept, indices
        self.skipped = sorted([*self.skipped, *rejected], key=lambda e: e.index)
        return rejected

    def report(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "schema": self.schema,
            "total": self.total,
            "loaded": len(self.records),
            "skipped": len(self.skipped),
            "skipped_records": [error.as_dict() for error in self.skipped[:100]],
        }


# --------------------------------------------------------------------------------------------
# Field access with errors that say where


class _Fields:
    """Typed access to one raw record; every failure names file, record and field."""

    def __init__(self, file: str, index: int, raw: Any, id_key: str):
        self.file, self.index = file, index
        if not isinstance(raw, dict):
            raise RecordError(
                file, index, None, "<record>", f"expected an object, got {type(raw).__name__}"
            )
        self.raw = raw
        self.id = raw.get(id_key, index)

    def fail(self, name: str, reason: str) -> RecordError:
        return RecordError(self.file, self.index, self.id, name, reason)

    def get(self, path: str, kind: type = str, *, required: bool = True, default: Any = None):
        value: Any = self.raw
        for part in path.split("."):
            if not isinstance(value, dict) or part not in value:
                if required:
                    raise self.fail(path, "missing")
                return default
            value = value[part]
        if value is None and not required:
            return default
        if kind is str:
            if not isinstance(value, str):
                raise self.fail(path, f"expected a string, got {type(value).__name__}")
            if required and not value.strip():
                raise self.fail(path, "empty")
        elif kind is int:
            if isinstance(value, bool) or not isinstance(value, int):
                raise self.fail(path, f"expected an integer, got {type(value).__name__}")
        elif kind is list:
            if isinstance(value, str):
                value = [value]
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise self.fail(path, "expected a list of strings")
            value = tuple(value)
        return value


def _check_subject(record: _Fields, subject: str, prompt: str, field_name: str) -> None:
    if subject not in prompt:
        raise record.fail(field_name, f"subject {subject!r} is not in the prompt {prompt!r}")


def _check_targets(record: _Fields, target_true: str, target_new: str, field_name: str) -> None:
    if target_new.strip() == target_true.strip():
        raise record.fail(field_name, f"target_new equals the true answer {target_true!r}")


def _template_of(prompt: str, subject: str) -> str:
    """Turn a filled prompt into a template at the subject's last occurrence."""
    at = prompt.rfind(subject)
    return prompt[:at] + "{}" + prompt[at + len(subject) :]


# --------------------------------------------------------------------------------------------
# Parsers, one per schema


def _parse_known(record: _Fields) -> KnownFact:
    subject = record.get("subject")
    prompt = record.get("prompt")
    _check_subject(record, subject, prompt, "subject")
    return KnownFact(
        id=record.get("known_id", int),
        subject=subject,
        prompt=prompt,
        attribute=record.get("attribute"),
        relation_id=record.get("relation_id", required=False),
    )


def _parse_counterfact_rome(record: _Fields) -> CounterfactCase:
    subject = record.get("requested_rewrite.subject")
    template = record.get("requested_rewrite.prompt")
    if "{}" not in template:
        raise record.fail("requested_rewrite.prompt", "no '{}' placeholder for the subject")
    target_true = record.get("requested_rewrite.target_true.str")
    target_new = record.get("requested_rewrite.target_new.str")
    _check_targets(record, target_true, target_new, "requested_rewrite.target_new.str")
    paraphrases = record.get("paraphrase_prompts", list, required=False, default=())
    for prompt in paraphrases:
        _check_subject(record, subject, prompt, "paraphrase_prompts")
    return CounterfactCase(
        id=record.get("case_id", int),
        subject=subject,
        template=template,
        target_true=target_true,
        target_new=target_new,
        paraphrase_prompts=paraphrases,
        neighborhood_prompts=record.get("neighborhood_prompts", list, required=False, default=()),
        attribute_prompts=record.get("attribute_prompts", list, required=False, default=()),
        generation_prompts=record.get("generation_prompts", list, required=False, default=()),
        relation_id=record.get("requested_rewrite.relation_id", required=False),
        target_new_id=record.get("requested_rewrite.target_new.id", required=False),
        schema="rome",
    )


def _parse_counterfact_easyedit(record: _Fields) -> CounterfactCase:
    subject = record.get("subject")
    prompt = record.get("prompt")
    _check_subject(record, subject, prompt, "subject")
    target_true = record.get("ground_truth")
    target_new = record.get("target_new")
    _check_targets(record, target_true, target_new, "target_new")
    paraphrases = record.get("rephrase_prompt", list, required=False, default=())
    neighbours = record.get("locality_prompt", list, required=False, default=())
    locality_truth = record.get("locality_ground_truth", required=False)
    if neighbours and locality_truth is not None and locality_truth.strip() != target_true.strip():
        # In CounterFact the neighbours share the true answer; a record that says otherwise
        # would make the NS metric compare against the wrong string.
        raise record.fail(
            "locality_ground_truth",
            f"{locality_truth!r} differs from ground_truth {target_true!r}",
        )
    return CounterfactCase(
        id=record.get("case_id", int),
        subject=subject,
        template=_template_of(prompt, subject),
        target_true=target_true,
        target_new=target_new,
        paraphrase_prompts=paraphrases,
        neighborhood_prompts=neighbours,
        schema="easyedit",
    )


ZSRE_TARGETS = ("answers", "alt")


def _parse_zsre(record: _Fields, target: str = "answers") -> ZsreCase:
    """ROME's zsRE request from a MEND-schema record. `target`: "answers" takes answers[0] as
    the new answer, as ROME and MEMIT do; "alt" takes MEND's alternative answer (EasyEdit's
    zsRE), a departure from the reference. Extra keys (EasyEdit's `portability`) are ignored."""
    subject = record.get("subject")
    src = record.get("src")
    _check_subject(record, subject, src, "subject")
    answers = record.get("answers", list)
    if not answers or not answers[0].strip():
        raise record.fail("answers", "no answer")
    target_new = answers[0] if target == "answers" else record.get("alt")
    return ZsreCase(
        id=record.index,  # ROME numbers zsRE cases by their position in the file
        subject=subject,
        template=_template_of(src, subject),
        target_new=target_new,
        paraphrase_prompts=record.get("rephrase", list),
        neighborhood_prompt=record.get("loc") + "?",
        neighborhood_answer=record.get("loc_ans"),
    )


def _parse_request(record: _Fields) -> CounterfactCase:
    """A request as the editing API takes it: `prompt` (a "{}" template for the subject, or the
    prompt with the subject written in), `subject`, `target_new`, optionally `target_true` (the
    answer it replaces; scores need it) and ROME's lists of paraphrase, neighbourhood and
    generation prompts; a CounterFact record of either schema is parsed as in a data file."""
    if "requested_rewrite" in record.raw:
        return _parse_counterfact_rome(record)
    if "ground_truth" in record.raw:
        return _parse_counterfact_easyedit(record)
    subject = record.get("subject")
    prompt = record.get("prompt")
    if "{}" not in prompt:
        _check_subject(record, subject, prompt, "subject")
        prompt = _template_of(prompt, subject)
    target_new = record.get("target_new")
    target_true = record.get("target_true", required=False)
    if target_true is not None:
        _check_targets(record, target_true, target_new, "target_new")
    paraphrases = record.get("paraphrase_prompts", list, required=False, default=())
    for paraphrase in paraphrases:
        _check_subject(record, subject, paraphrase, "paraphrase_prompts")
    return CounterfactCase(
        id=record.get("case_id", int, required=False, default=record.index),
        subject=subject,
        template=prompt,
        target_true=target_true,
        target_new=target_new,
        paraphrase_prompts=paraphrases,
        neighborhood_prompts=record.get("neighborhood_prompts", list, required=False, default=()),
        generation_prompts=record.get("generation_prompts", list, required=False, default=()),
    )


SCHEMA_SIGNS = {"rome": ("requested_rewrite",), "easyedit": ("target_new", "ground_truth")}


def detect_counterfact_schema(raws: Sequence[Any]) -> str:
    """The schema most of the file's records follow, so one malformed record (first or not) is a
    bad record of that schema rather than a file of an "unknown schema"."""
    votes = {
        name: sum(isinstance(r, dict) and all(k in r for k in keys) for r in raws)
        for name, keys in SCHEMA_SIGNS.items()
    }
    best = max(votes, key=votes.get)
    if votes[best] == 0:
        first = next((r for r in raws if isinstance(r, dict)), {})
        raise ValueError(
            "unknown CounterFact schema: no record has 'requested_rewrite' (ROME) or "
            f"'target_new' + 'ground_truth' (EasyEdit); the first record's keys are {sorted(first)}"
        )
    if list(votes.values()).count(votes[best]) > 1:
        raise ValueError(f"the records mix CounterFact schemas equally ({votes}); split the file")
    return best


def _load(
    path: Path,
    parse: Callable[[_Fields], Any] | None,
    id_key: str,
    on_error: OnError,
    schema: str | None,
    limit: int | None,
) -> Loaded:
    if on_error not in ("fail", "skip"):
        raise ValueError(f"on_error must be 'fail' or 'skip', got {on_error!r}")
    path = Path(path)
    try:
        raws = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{path}: no such data file (run `make data` or set paths.data)"
        ) from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON: {error}") from None
    if not isinstance(raws, list):
        raise ValueError(f"{path}: expected a JSON list of records, got {type(raws).__name__}")
    if parse is None:  # CounterFact: the schema most records follow
        try:
            schema = detect_counterfact_schema(raws)
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from None
        parse = _parse_counterfact_rome if schema == "rome" else _parse_counterfact_easyedit
    return _parse_all(str(path), raws, parse, id_key, on_error, schema, limit)


def _parse_all(
    source: str,
    raws: Sequence[Any],
    parse: Callable[[_Fields], Any],
    id_key: str,
    on_error: OnError,
    schema: str | None,
    limit: int | None,
) -> Loaded:
    """Each raw record parsed, bad ones raised or counted, ids unique; `source` names them."""
    loaded = Loaded(path=source, schema=schema or "")
    first_at: dict[Any, int] = {}  # id -> the record that has it
    for index, raw in enumerate(raws):
        if limit is not None and len(loaded.records) >= limit:
            break
        try:
            record = parse(_Fields(source, index, raw, id_key))
            if record.id in first_at:
                # Results are keyed by id: a second record with it would replace the first's.
                raise RecordError(
                    source,
                    index,
                    record.id,
                    id_key,
                    f"duplicate id {record.id} (already used by record {first_at[record.id]})",
                )
            first_at[record.id] = index
            loaded.records.append(record)
            loaded.indices.append(index)
        except RecordError as error:
            if on_error == "fail":
                raise
            loaded.skipped.append(error)
    return loaded


def load_known(path: str | Path, *, on_error: OnError = "fail", limit: int | None = None) -> Loaded:
    """Known facts in ROME's `known_1000.json` schema."""
    return _load(Path(path), _parse_known, "known_id", on_error, "known", limit)


def load_counterfact(
    path: str | Path, *, on_error: OnError = "fail", limit: int | None = None
) -> Loaded:
    """CounterFact cases, ROME schema or EasyEdit schema (detected from the records)."""
    return _load(Path(path), None, "case_id", on_error, None, limit)


def load_zsre(
    path: str | Path,
    *,
    on_error: OnError = "fail",
    limit: int | None = None,
    target: str = "answers",
) -> Loaded:
    """zsRE questions in MEND's schema (`subject, src, rephrase, answers, alt, loc, loc_ans`)."""
    if target not in ZSRE_TARGETS:
        raise ValueError(f"the zsRE target must be one of {ZSRE_TARGETS}, got {target!r}")
    return _load(Path(path), lambda r: _parse_zsre(r, target), "case_id", on_error, "zsre", limit)


def load_requests(raws: Sequence[Any], source: str = "requests") -> Loaded:
    """Edit requests given in memory (`_parse_request`), checked as a data file's records are:
    the first bad one raises a `RecordError` naming `source`, the request and the field."""
    return _parse_all(source, list(raws), _parse_request, "case_id", "fail", "requests", None)


LOADERS: dict[str, Callable[..., Loaded]] = {
    "known": load_known,
    "counterfact": load_counterfact,
    "zsre": load_zsre,
}


def load_records(kind: str, path: str | Path, **kwargs: Any) -> Loaded:
    try:
        loader = LOADERS[kind]
    except KeyError:
        raise ValueError(f"data kind must be one of {sorted(LOADERS)}, got {kind!r}") from None
    return loader(path, **kwargs)


def take_shard(items: Iterable[Any], index: int, count: int) -> list[Any]:
    """Every `count`-th item starting at `index`: a deterministic split across jobs."""
    if not 0 <= index < count:
        raise ValueError(f"shard index {index} must be in [0, {count})")
    return [item for position, item in enumerate(items) if position % count == index]


def missing_by_shard(ids: Sequence[Any], done: Container[Any], count: int) -> dict[int, list[Any]]:
    """For each of `count` shards, the ids it should have produced that are not in `done`."""
    return {
        index: [i for i in take_shard(ids, index, count) if i not in done] for index in range(count)
    }
