"""Evaluation results on disk: one JSONL line per finished case, and their summaries.

Lines are appended and fsynced, so a killed run loses at most the line it was writing, and a torn
last line is ignored on reading. `PreCache` keeps the unedited model's scores per case, shared by
every editor's run of a model and data set, keyed by what determines them. Its rows and
`ValueCache`'s carry a checksum (`files.sealed`): a damaged row is named and recomputed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from metrics import counterfact as cf
from metrics.intervals import mean_ci
from pipeline.core.editing.requests import EditResult
from pipeline.core.files import file_lock, intact, sealed
from pipeline.core.models import LoadedModel, identity_of
from pipeline.core.scoring import score_cases
from pipeline.data.records import CounterfactCase

log = logging.getLogger(__name__)


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


def checked_rows(paths: Sequence[Path]) -> dict[str, dict[str, Any]]:
    """A cache's rows by key, each as written (`sealed`): a row whose checksum fails (a changed
    number, or one written before rows had one) is left out, so it is recomputed, and named in a
    warning with its file unless a later intact row of the same key replaced it."""
    rows: dict[str, dict[str, Any]] = {}
    damaged: dict[str, Path] = {}
    for path in paths:
        for row in read_jsonl([path]):
            key = row.get("key") if isinstance(row, dict) else None
            if key is None:
                continue
            if intact(row):
                rows[key] = {k: v for k, v in row.items() if k != "sha256"}
                damaged.pop(key, None)
            elif key not in rows:
                damaged[key] = path
    for key, path in damaged.items():
        log.warning("%s: the row of key %s fails its checksum; recomputing it", path, key)
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
        record["edit"] = edit_summary(result)
    return record


def edit_summary(result: EditResult) -> dict[str, Any]:
    """What a case's record keeps of its edit."""
    return {
        "ok": result.ok,
        "error": None if result.ok else result.error.reason,
        "steps": result.steps,
        "target_nll": result.target_nll,
        "update_norm": result.info.get("update_norm"),
    }


def scored(probs: dict[str, list[tuple[float, float]]]) -> dict[str, Any]:
    return {"probs": probs, "metrics": cf.case_metrics(probs)}


def pre_key(lm: LoadedModel, case: CounterfactCase) -> str:
    """What a case's unedited scores depend on: the weights (`identity`: a random model's seed
    included), their dtype and the case's own content. The scores are teacher-forced, so no
    sampling seed enters; generation metrics are not cached."""
    description = {"model": identity_of(lm), "dtype": str(lm.dtype), "case": case.to_dict()}
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:32]


class PreCache:
    """Unedited scores per case, shared by every editor's run of this model and data.

    Rows are found by `pre_key`, not by case id, so another seed, model file, dtype or a record
    edited under the same id misses and is scored afresh. Rows written before the key or the
    checksum existed, and damaged ones, are never used (they are recomputed)."""

    def __init__(self, directory: Path, tag: str, lm: LoadedModel):
        self.path = directory / f"pre-{tag}.jsonl"
        self.lm = lm
        self.rows = checked_rows(sorted(directory.glob("pre-*.jsonl")))

    def get(self, cases: Sequence[CounterfactCase], rows_per_pass: int) -> list:
        keys = [pre_key(self.lm, c) for c in cases]
        missing = [(c, k) for c, k in zip(cases, keys, strict=True) if k not in self.rows]
        if missing:
            fresh = score_cases(self.lm, [c for c, _ in missing], batch_size=rows_per_pass)
            new_rows = [
                {"id": c.id, "key": k, **scored(p)}
                for (c, k), p in zip(missing, fresh, strict=True)
            ]
            with file_lock(self.path.with_suffix(".lock")):  # jobs of a sweep share the file
                append_jsonl(self.path, [sealed(row) for row in new_rows])
            self.rows.update({r["key"]: r for r in new_rows})
        return [{k: v for k, v in self.rows[key].items() if k not in ("id", "key")} for key in keys]


class GenerationCache:
    """The unedited model's generation metrics (texts, GE, RS) per case, shared by every editor's
    run of this model and data: sampling them is half of a full-protocol case's time, and every
    editor's run samples the same ones (`generation_metrics` seeds each case by its id, so a case
    gives the same texts in any batch, bit for bit). A case is found by everything its texts
    depend on: the weights, their dtype, the case's content and `settings` (the seed, lengths,
    whether RS is computed)."""

    def __init__(self, directory: Path, tag: str, lm: LoadedModel):
        self.path = directory / f"generation-{tag}.jsonl"
        self.lm = lm
        self.rows = checked_rows(sorted(directory.glob("generation-*.jsonl")))

    def key(self, case: CounterfactCase, settings: dict[str, Any]) -> str:
        description = {
            "model": identity_of(self.lm),
            "dtype": str(self.lm.dtype),
            "case": case.to_dict(),
            **settings,
        }
        return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:32]

    def get(
        self,
        cases: Sequence[CounterfactCase],
        settings: dict[str, Any],
        sample: Callable[[Sequence[CounterfactCase]], list[dict[str, Any]]],
    ) -> list[dict[str, Any]]:
        """Each case's cached metrics under `settings`; `sample(missing cases)` for the rest,
        cached."""
        keys = [self.key(c, settings) for c in cases]
        missing = [(c, k) for c, k in zip(cases, keys, strict=True) if k not in self.rows]
        if missing:
            fresh = sample([c for c, _ in missing])
            new_rows = [
                {"key": k, "id": c.id, "metrics": m}
                for (c, k), m in zip(missing, fresh, strict=True)
            ]
            with file_lock(self.path.with_suffix(".lock")):
                append_jsonl(self.path, [sealed(row) for row in new_rows])
            self.rows.update({r["key"]: r for r in new_rows})
        return [self.rows[key]["metrics"] for key in keys]


class ValueCache:
    """Optimised values (MEMIT's z) per `values.value_key`, shared by every run and editor of
    this model that optimises the same z: MEMIT, EMMET and AlphaEdit at the same top layer, the
    sizes of a mass-editing curve, a rerun. One JSONL file, appended under a lock by every job
    that shares it, read at start. A value read back is the one first computed, so a run that reuses it is
    reproducible bit for bit; recomputed in another batch it would differ by float rounding."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.path = directory / "values.jsonl"
        self.rows = checked_rows([self.path] if self.path.exists() else [])

    def get(self, key: str) -> dict | None:
        return self.rows.get(key)

    def put(self, rows: dict[str, dict]) -> None:
        new_rows = [{"key": key, **row} for key, row in rows.items()]
        with file_lock(self.path.with_suffix(".lock")):
            append_jsonl(self.path, [sealed(row) for row in new_rows])
        self.rows.update({r["key"]: r for r in new_rows})


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
    # The edit's paired change of each probability test (what "did not edit" and tuning read).
    out["change"] = {k: paired_change(records, k) for k in ("ES", "PS", "NS")}
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


def paired_change(records: Sequence[dict[str, Any]], name: str) -> dict[str, float]:
    """The edit's change of one case metric, post minus pre, paired case by case (percentage
    points, mean with a t interval over the cases that have the metric both times). Pairing
    removes the spread between cases that two unpaired intervals both carry."""
    pairs = np.array(
        [[r["pre"]["metrics"].get(name, math.nan), r["post"]["metrics"].get(name, math.nan)]
         for r in records],
        dtype=np.float64,
    ).reshape(-1, 2)  # fmt: skip
    pairs = pairs[~np.isnan(pairs).any(axis=1)]
    if len(pairs) < 2:
        return {"mean": math.nan, "low": math.nan, "high": math.nan, "n": len(pairs)}
    return {k: v * 100 if k != "n" else v for k, v in mean_ci(pairs[:, 1] - pairs[:, 0]).items()}


def headline(summary: dict[str, Any]) -> str:
    def row(phase):
        s = summary[phase]
        return " ".join(
            f"{k}={s[k]['mean']:.1f}" for k in ("S", "ES", "PS", "NS", "EM", "PM", "NM")
        )

    return f"pre:  {row('pre')}\npost: {row('post')}  (n={summary['n_cases']})"
