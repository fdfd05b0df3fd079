"""The config schema: what each key may hold, checked before a stage has any side effect.

A wrong type or value (`dtype=float61`, `data.limit=abc`) stops the run before its results
directory, `config.yaml` or W&B run exists, naming the key, the value and what is allowed. The
editor's numbers come from the hyperparameter classes' own annotations, so the two cannot drift.
"""

from __future__ import annotations

import functools
import typing
from dataclasses import dataclass, fields
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from pipeline.core.models import DTYPES


@dataclass(frozen=True)
class Setting:
    """What one config key may hold: its type(s), the allowed values, a lower bound, null."""

    kind: type | tuple[type, ...]
    choices: tuple = ()
    minimum: float | None = None
    nullable: bool = False
    item: type | None = None  # for lists: each item's type

    def accepts(self, value: Any) -> bool:
        if value is None:
            return self.nullable
        if self.item is not None:
            return isinstance(value, list) and all(
                _is(v, self.item) and (not self.choices or v in self.choices) for v in value
            )
        return (
            _is(value, self.kind)
            and (not self.choices or value in self.choices)
            and (self.minimum is None or value >= self.minimum)
        )

    def allowed(self) -> str:
        if self.choices:
            text = f"one of {', '.join(str(c) for c in self.choices)}"
            text = f"a list, each {text}" if self.item is not None else text
        elif self.item is not None:
            text = f"a list of {_NAMES[self.item]}s"
        else:
            kinds = self.kind if isinstance(self.kind, tuple) else (self.kind,)
            text = " or ".join(f"{_ARTICLE[k]} {_NAMES[k]}" for k in kinds)
        if self.minimum is not None:
            text += f", at least {self.minimum:g}"
        return text + (", or null" if self.nullable else "")


_NAMES = {int: "integer", float: "number", str: "string", bool: "boolean", list: "list"}
_ARTICLE = {int: "an", float: "a", str: "a", bool: "a", list: "a"}


def _is(value: Any, kind: type | tuple[type, ...]) -> bool:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool):
        return bool in kinds
    return any(isinstance(value, float if k is float else k) for k in kinds) or (
        float in kinds and isinstance(value, int)
    )


INT, COUNT = Setting(int), Setting(int, minimum=1)
FLAG = Setting(bool)
# Keys every stage config may have (absent keys are not checked). The editor's numbers come from
# RomeHparams' own annotations below, so the two cannot drift apart.
SETTINGS: dict[str, Setting] = {
    "seed": Setting(int, minimum=0),
    "device": Setting(str),
    "dtype": Setting(str, choices=tuple(DTYPES)),
    "model.name": Setting(str),
    "model.source": Setting(str, choices=("gguf", "hub", "random")),
    "model.path": Setting(str, nullable=True),
    "data.limit": Setting(int, minimum=0, nullable=True),
    "data.on_error": Setting(str, choices=("skip", "fail")),
    "data.path": Setting(str, nullable=True),
    "data.download": FLAG,
    "data.derived": Setting(str, nullable=True),  # pipeline.data.sources.DERIVED names it
    "data.target": Setting(str, choices=("answers", "alt")),  # zsRE's new answer
    "shard.index": Setting(int, minimum=0),
    "shard.count": COUNT,
    "aggregate_only": FLAG,
    "allow_partial": FLAG,
    "snapshot_inputs": FLAG,
    "data_kinds": Setting(str, item=str),
    "tracking.mode": Setting(str, choices=("offline", "online", "disabled"), nullable=True),
    "batch_size": COUNT,
    "known_batch_size": COUNT,
    "layers": Setting(int, item=int, nullable=True),
    "eval.mode": Setting(str, choices=("independent", "mass", "sequential")),
    "eval.mass_sizes": Setting(int, item=int),
    "eval.sequential_batch": COUNT,
    "eval.contradictions": Setting(str, choices=("refuse", "drop_later")),
    "eval.cases_per_batch": COUNT,
    "eval.rows_per_pass": COUNT,
    "eval.checkpoints": Setting(int, item=int),
    "eval.generation": Setting((str, bool), choices=("auto", True, False)),
    "eval.max_new_tokens": COUNT,
    "eval.generation_cases": Setting(int, minimum=0, nullable=True),
    "eval.top_k": COUNT,
    "eval.perplexity": FLAG,
    "eval.perplexity_tokens": COUNT,
    "eval.perplexity_window": Setting(int, minimum=2),  # a window predicts all but its first
    "eval.perplexity_cases": COUNT,
    "eval.perplexity_batch": COUNT,
    "edit.prompts": Setting(str, item=str),
    "edit.max_new_tokens": COUNT,
    "edit.top_k": COUNT,
    "edit.save_model": FLAG,
    "edit.name": Setting(str, nullable=True),
    "trace.samples": COUNT,
    "trace.noise_multiplier": Setting(float, minimum=0),
    "trace.scale": Setting(float, minimum=0, nullable=True),
    "trace.distribution": Setting(str, choices=("gaussian", "uniform")),
    "trace.window": COUNT,
    "trace.kinds": Setting(str, item=str, choices=("hidden", "mlp", "attn")),
    "trace.severed": FLAG,
    "trace.whole_answer": FLAG,
    "trace.engine": Setting(str, choices=("fast", "reference", "attribution")),
    "trace.linearize": Setting(str, choices=("prob", "logprob")),
    "trace.batch_size": COUNT,
    "trace.limit": Setting(int, minimum=0, nullable=True),
    "trace.facts": Setting(str, choices=("known", "all")),
    "editor.layer": Setting((int, list), nullable=True),  # a list for multi-layer editors
    "editor.layers": Setting((list, str), nullable=True),  # a list; KN: all
    "editor.batch_size": COUNT,
    "editor.mom2.max_samples": Setting(int, minimum=1, nullable=True),
    "editor.mom2.max_tokens": Setting(int, minimum=1, nullable=True),
    "editor.mom2.max_length": COUNT,
    "editor.mom2.dtype": Setting(str, choices=("float64", "float32")),
    "editor.mom2.batch_size": COUNT,
    "corpus.source": Setting(str, choices=("auto", "local", "datasets", "sample")),
    "corpus.held_out.file": Setting(str, nullable=True),
    "corpus.held_out.sample_fraction": Setting(float, minimum=0),  # below 1: split_sample
}


@functools.cache
def editor_settings() -> dict[str, Setting]:
    """The editor's name and numbers, from the registry and the hyperparameter classes' own
    annotations, so the two cannot drift apart."""
    from pipeline.app.editors import EDITORS

    out = {"editor.name": Setting(str, choices=("none", *EDITORS))}
    for spec in EDITORS.values():
        for field in fields(spec.hparams):
            kind = typing.get_type_hints(spec.hparams)[field.name]
            if kind in (int, float, bool) and f"editor.{field.name}" not in SETTINGS:
                out.setdefault(f"editor.{field.name}", Setting(kind))
    return out


# Protocols one job must run whole, and why shards cannot split them.
UNSHARDED = {
    "mass": "each size edits the first N cases in one joint edit, so every shard would "
    "write the whole curve; run it as one job (shard.count=1)",
    "sequential": "each edit is made on the model all edits before it left, so the cases "
    "cannot be split; run it as one job (shard.count=1)",
}


class ConfigError(SystemExit):
    """Settings of the wrong type or value, each named with what is allowed."""


def validate_config(cfg: DictConfig) -> None:
    """Check every known key of `cfg` before the run has any side effect; raise ConfigError."""
    absent = object()
    problems = []
    for key, setting in {**SETTINGS, **editor_settings()}.items():
        value = OmegaConf.select(cfg, key, default=absent)
        if value is absent:
            continue
        if isinstance(value, (DictConfig, ListConfig)):
            value = OmegaConf.to_container(value, resolve=True)
        if not setting.accepts(value):
            problems.append(f"{key}={value!r} is not allowed (allowed: {setting.allowed()})")
    kinds, kind = cfg.get("data_kinds"), OmegaConf.select(cfg, "data.kind", default=None)
    if kinds is not None and kind is not None and kind not in kinds:
        name = OmegaConf.select(cfg, "data.name", default=kind)
        problems.append(
            f"data ({name}) holds {kind} records, which this stage does not read "
            f"(allowed: data of kind {', '.join(kinds)})"
        )
    index = OmegaConf.select(cfg, "shard.index", default=0)
    count = OmegaConf.select(cfg, "shard.count", default=1)
    if not problems and not index < count:
        problems.append(f"shard.index={index!r} is not allowed (allowed: 0 to {count - 1})")
    mode = OmegaConf.select(cfg, "eval.mode", default="independent")
    if not problems and count > 1 and mode in UNSHARDED:
        problems.append(f"shard.count={count} with eval.mode={mode}: {UNSHARDED[mode]}")
    if problems:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems))
