"""One edit made on a loaded model and kept there: what `pipeline.api` returns and the `edit`
stage saves.

`PendingEdit.check` takes requests (plain dicts, CounterFact records or cases) and the configured
editor (`cfg.editor`, as every stage reads it) and refuses a bad request before anything is
computed, with the errors `evaluate` gives a bad record: the record parsers of
`pipeline.data.records` (subject not in the prompt, target equal to the true answer), then
`scoring.too_long` (inputs beyond the model's context, the editor's context templates counted)
and `refuse_contradictions` (one prompt, two targets). `apply` computes the edit as a mass edit of
the requests (`CaseEditor.mass`: one joint solve for MEMIT and its successors, one request after
another for ROME, FT and KN) and writes it into the weights. Of one request it is the update
`evaluate` computes for it: exactly for ROME, FT and KN; for MEMIT's family to float32 rounding,
since the lower layers' update is written into the weights before the next layer's keys are read
here, and added by hooks in `evaluate`'s independent protocol.

`EditedModel` keeps the touched projections' weights from before and after the edit, so the
unedited model is one copy away (`restore` puts it back bit for bit; `generate` and `scores`
read both models), and `save` writes a directory `transformers` loads as it is, with a manifest
of what was edited, by which editor and settings, on which weights and statistics.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from pipeline.app.editors import CaseEditor, edit_layers, spec, stats_key
from pipeline.app.results import case_record, scored
from pipeline.core import files
from pipeline.core.editing.editor import JointEdit
from pipeline.core.editing.requests import refuse_contradictions
from pipeline.core.editing.updates import apply_update, as_list
from pipeline.core.models import LoadedModel
from pipeline.core.scoring import generate, score_cases, too_long
from pipeline.core.tokens import encode
from pipeline.data.records import CounterfactCase, load_requests

log = logging.getLogger(__name__)

MANIFEST = "edit.json"  # beside the weights in a saved directory


def as_records(requests: Any) -> list[Any]:
    """A list of raw requests from one request or many; a parsed `CounterfactCase` becomes the
    plain request it stands for, so every request goes through the same checks."""
    if isinstance(requests, (Mapping, CounterfactCase)):
        requests = [requests]
    if isinstance(requests, (str, bytes)) or not isinstance(requests, Sequence):
        raise TypeError(
            "requests: a dict (prompt, subject, target_new[, target_true]), a CounterFact "
            f"record, or a list of them; got {type(requests).__name__}"
        )
    return [_as_request(r) if isinstance(r, CounterfactCase) else r for r in requests]


def _as_request(case: CounterfactCase) -> dict[str, Any]:
    request = {
        "case_id": case.id,
        "prompt": case.template,
        "subject": case.subject,
        "target_new": case.target_new,
        "paraphrase_prompts": list(case.paraphrase_prompts),
        "neighborhood_prompts": list(case.neighborhood_prompts),
        "generation_prompts": list(case.generation_prompts),
    }
    return request | ({"target_true": case.target_true} if case.target_true is not None else {})


class NothingEdited(ValueError):
    """Every request was refused by the editor (e.g. its target is already the answer)."""


@dataclass
class PendingEdit:
    """Requests checked against the model and the configured editor; nothing edited yet."""

    cfg: DictConfig
    lm: LoadedModel
    editor: CaseEditor
    cases: list[CounterfactCase]

    @classmethod
    def check(
        cls, cfg: DictConfig, lm: LoadedModel, requests: Any, source: str = "requests"
    ) -> PendingEdit:
        """The checks `evaluate` makes of its records, on `requests` (`source` names them in an
        error), or the first failure raised (a `RecordError`, or `ContradictoryRequests`)."""
        loaded = load_requests(as_records(requests), source)
        if not loaded.records:
            raise ValueError(f"{source}: no edit requests")
        if cfg.editor.name == "none":
            raise ValueError("editor 'none' makes no edit; choose an editor (rome, memit, ...)")
        editor = CaseEditor(cfg, lm)
        prefix = editor.prefix_tokens()
        loaded.reject(lambda case: too_long(lm, case, edit_prefix=prefix), "fail")
        refuse_contradictions(editor.requests(loaded.records))
        return cls(cfg, lm, editor, loaded.records)

    def apply(self) -> EditedModel:
        """Compute the edit (key statistics loaded, or computed with a progress bar) and write it
        into the model's weights."""
        started = time.perf_counter()
        edit = self.editor.mass(self.cases)
        refused = [r for r in edit.results if not r.ok]
        for result in refused:
            log.warning("not edited: %s", result.error)
        if len(refused) == len(edit.results):
            raise NothingEdited(
                "no request could be edited: " + "; ".join(str(r.error) for r in refused)
            )
        return EditedModel(self, edit, time.perf_counter() - started)


def update_sha256(updates: Sequence[Any]) -> str:
    """A digest of an edit's updates, in order: each one's kind, layer, and its tensors' dtype,
    shape and bytes (the factors of a low-rank update, not the dense matrix they make)."""
    hasher = hashlib.sha256()
    for update in updates:
        hasher.update(f"{type(update).__name__}:{update.layer}".encode())
        for field in dataclasses.fields(update):
            value = getattr(update, field.name)
            if isinstance(value, torch.Tensor):
                tensor = value.detach().cpu().contiguous()
                hasher.update(f"{field.name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
                hasher.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return hasher.hexdigest()


class EditedModel:
    """The model with an edit written into its weights. A context manager: the weights are
    restored on leaving the block (`restore`)."""

    def __init__(self, pending: PendingEdit, edit: JointEdit, seconds: float):
        self.cfg, self.lm, self.cases = pending.cfg, pending.lm, pending.cases
        self.editor_name = pending.editor.name
        self.hparams = pending.editor.hparams
        self.results = edit.results
        self.updates = as_list(edit.updates)
        self.seconds = seconds
        layers = sorted({u.layer % self.lm.n_layers for u in self.updates})
        self._before = {layer: self._weight(layer).clone() for layer in layers}
        apply_update(self.lm, self.updates)
        self._after = {layer: self._weight(layer).clone() for layer in layers}
        self.active = True

    def _weight(self, layer: int) -> torch.Tensor:
        return self.lm.mlp_out_weight(layer).detach()

    def _put(self, weights: Mapping[int, torch.Tensor]) -> None:
        with torch.no_grad():
            for layer, weight in weights.items():
                self.lm.mlp_out_weight(layer).copy_(weight)

    def restore(self) -> None:
        """The unedited weights back, bit for bit (a second call does nothing)."""
        if self.active:
            self._put(self._before)
            self.active = False

    def __enter__(self) -> EditedModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()

    def _require_active(self, what: str) -> None:
        if not self.active:
            raise RuntimeError(f"{what}: the edit was restored; edit the model again")

    @contextlib.contextmanager
    def unedited(self) -> Iterator[LoadedModel]:
        """The model as it was before the edit, for the block; edited again after it."""
        self._require_active("unedited")
        self._put(self._before)
        try:
            yield self.lm
        finally:
            self._put(self._after)

    @property
    def failed(self) -> list[dict[str, Any]]:
        """The requests the editor refused (e.g. a target the model already predicts)."""
        return [{"id": r.request.id, "error": r.error.reason} for r in self.results if not r.ok]

    # ----------------------------------------------------------------------------------------
    # Looking at the edit

    def prompts(self) -> list[str]:
        """Each request's prompt with its subject, then its generation prompts (CounterFact's)."""
        out = [c.prompt for c in self.cases]
        out += [p for c in self.cases for p in c.generation_prompts]
        return list(dict.fromkeys(out))

    def generate(
        self,
        prompts: Sequence[str] | str | None = None,
        *,
        max_new_tokens: int = 20,
        top_k: int = 1,
        seed: int = 0,
    ) -> list[dict[str, str]]:
        """Continuations before and after the edit, side by side: one row per prompt (default:
        `prompts()`). `top_k=1` is greedy decoding; above 1, top-k sampling with `seed`, the
        same draws before and after (`scoring.generate`). Generation stops at the model's
        context; a prompt that fills it is refused, named."""
        self._require_active("generate")
        prompts = [prompts] if isinstance(prompts, str) else list(prompts or self.prompts())
        longest = max(len(encode(self.lm.tokenizer, p)) for p in prompts)
        room = self.lm.context_length - longest
        if room < 1:
            worst = max(prompts, key=lambda p: len(encode(self.lm.tokenizer, p)))
            raise ValueError(
                f"prompt {worst!r} has {longest} tokens: no room to generate in the model's "
                f"context of {self.lm.context_length}"
            )
        options = dict(max_new_tokens=min(int(max_new_tokens), room), top_k=top_k, seed=seed)
        with self.unedited():
            before = generate(self.lm, prompts, **options)
        after = generate(self.lm, prompts, **options)
        return [
            {"prompt": p, "before": b, "after": a}
            for p, b, a in zip(prompts, before, after, strict=True)
        ]

    def scores(self, batch_size: int = 32) -> list[dict[str, Any]]:
        """Each request's probabilities and metrics (ES, PS, NS and the magnitudes EM, PM, NM)
        before ("pre") and after ("post") the edit, as `evaluate` writes a case
        (`results.case_record`). ES reads the prompt; PS and NS need paraphrase and
        neighbourhood prompts (NaN without); every score needs the request's `target_true`."""
        self._require_active("scores")
        missing = [c.id for c in self.cases if c.target_true is None]
        if missing:
            raise ValueError(
                f"scores compare target_new with target_true (the answer the edit replaces); "
                f"the requests with ids {missing} have no target_true"
            )
        with self.unedited():
            pre = score_cases(self.lm, self.cases, batch_size=batch_size)
        post = score_cases(self.lm, self.cases, batch_size=batch_size)
        seconds = self.seconds / len(self.cases)
        return [
            case_record(case, scored(p), scored(q), result, seconds)
            for case, p, q, result in zip(self.cases, pre, post, self.results, strict=True)
        ]

    # ----------------------------------------------------------------------------------------
    # Saving

    def statistics(self) -> list[dict[str, Any]]:
        """The key statistics the edit used: each layer's cache key (`StatsKey.metadata`)."""
        if not spec(self.cfg.editor).needs_keys:
            return []
        layers = sorted({x % self.lm.n_layers for x in edit_layers(self.cfg.editor, self.lm.name)})
        return [stats_key(self.cfg, self.lm, layer)[0].metadata() for layer in layers]

    def manifest(self) -> dict[str, Any]:
        """What the saved model is: the requests, the editor and its settings, the base model,
        the statistics, the update's sha256 and the project's commit."""
        from pipeline.app.stage import git_state  # here: importing the API needs no Hydra

        editor = OmegaConf.to_container(self.cfg.editor, resolve=True)
        return {
            "requests": [c.to_dict() for c in self.cases],
            "editor": {
                "name": self.editor_name,
                "hparams": dataclasses.asdict(self.hparams),
                "config": editor,
            },
            "failed": self.failed,
            "base_model": {
                "name": self.lm.name,
                "source": self.lm.source,
                "identity": self.lm.identity,
                "dtype": str(self.lm.dtype).removeprefix("torch."),
                "spec": OmegaConf.to_container(self.cfg.model, resolve=True),
            },
            "statistics": self.statistics(),
            "update": {
                "sha256": update_sha256(self.updates),
                "layers": sorted({u.layer % self.lm.n_layers for u in self.updates}),
                "kinds": sorted({type(u).__name__ for u in self.updates}),
            },
            "edit_seconds": round(self.seconds, 3),
            "git": git_state(),
        }

    def save(self, directory: str | Path) -> Path:
        """The edited model as `save_pretrained` writes it (weights, config, tokenizer), which
        `transformers.AutoModelForCausalLM.from_pretrained(directory)` loads, and `edit.json`
        (`manifest`) beside it."""
        self._require_active("save")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.lm.model.save_pretrained(directory)
        self.lm.tokenizer.save_pretrained(directory)
        files.write_json(directory / MANIFEST, self.manifest())
        return directory


def generation_markdown(rows: Sequence[Mapping[str, str]]) -> str:
    """The before/after rows as a Markdown table (line breaks shown as ⏎, pipes escaped)."""

    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\r", "").replace("\n", "⏎")

    lines = ["| prompt | before | after |", "|---|---|---|"]
    lines += [f"| {cell(r['prompt'])} | {cell(r['before'])} | {cell(r['after'])} |" for r in rows]
    return "\n".join(lines) + "\n"


def request_slug(cases: Sequence[CounterfactCase], limit: int = 60) -> str:
    """A directory name for an edit: the first request's subject and new target (and how many
    more), in lower case letters, digits and dashes."""
    first = cases[0]
    text = f"{first.subject} {first.target_new}"
    slug = "-".join("".join(ch if ch.isalnum() else " " for ch in text.lower()).split())
    slug = slug[:limit].strip("-") or "edit"
    return slug + (f"-and-{len(cases) - 1}-more" if len(cases) > 1 else "")
