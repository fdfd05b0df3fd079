"""Editors from configuration: hyperparameters, key statistics and context templates.

The stage-layer side of editing. It reads `cfg.editor`, `cfg.corpus` and `cfg.paths` and keeps
files in `paths.cache`; `pipeline.core.editing.rome` and `pipeline.core.second_moment` stay plain functions.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from pipeline.core import files
from pipeline.core.editing import rome
from pipeline.core.editing.requests import EditRequest, EditResult
from pipeline.core.editing.rome import RomeHparams, compute_updates
from pipeline.core.editing.templates import generate_context_templates
from pipeline.core.editing.updates import preserved_weights
from pipeline.core.files import file_lock
from pipeline.core.models import LoadedModel
from pipeline.core.second_moment import SecondMoment, StatsKey, cached_second_moment
from pipeline.data import corpus
from pipeline.data.records import CounterfactCase

log = logging.getLogger(__name__)

ROME_EDITORS = ("rome", "r-rome")
TextSource = Callable[[], Iterable[str]]


def edit_layer(editor: DictConfig, model_name: str) -> int:
    """`editor.layer` if set, else the editor's preset for this model."""
    if editor.get("layer") is not None:
        return int(editor.layer)
    presets = editor.get("layers") or {}
    if model_name not in presets:
        raise ValueError(
            f"editor '{editor.name}' has no layer preset for model '{model_name}' "
            f"(presets: {sorted(presets)}); choose one with editor.layer=N"
        )
    return int(presets[model_name])


def rome_hparams(editor: DictConfig, model_name: str) -> RomeHparams:
    """RomeHparams from `conf/editor/{rome,r-rome}.yaml`; unknown keys there are an error."""
    if editor.name not in ROME_EDITORS:
        raise ValueError(f"editor '{editor.name}' is not a ROME editor ({ROME_EDITORS})")
    fields = {f.name for f in dataclasses.fields(RomeHparams)}
    settings = OmegaConf.to_container(editor, resolve=True)
    stage_keys = {"name", "layers", "batch_size", "mom2"}
    unknown = set(settings) - fields - stage_keys
    if unknown:
        raise ValueError(f"unknown editor settings {sorted(unknown)} in editor '{editor.name}'")
    values = {key: value for key, value in settings.items() if key in fields}
    values["layer"] = edit_layer(editor, model_name)
    return RomeHparams(**values)


_WARNED: set[str] = set()


def open_corpus(corpus_cfg: DictConfig) -> tuple[str, TextSource]:
    """(name of the source actually used, a function that streams its texts).

    `auto` takes the text in the data root: the local files under `local_dir`, else WikiText
    cached by `datasets` under `cache_dir` (`make data`), else the small sample bundled in
    `data/samples/` (with a warning; its name says so, and so does the statistics' cache key).
    """
    source = corpus_cfg.source
    local_dir = Path(corpus_cfg.local_dir)
    has_local = local_dir.is_dir() and bool(corpus.local_files(local_dir))
    if source == "local" or (source == "auto" and has_local):
        if not has_local:
            raise FileNotFoundError(
                f"no corpus files in {local_dir}; set corpus.local_dir, or corpus.source=datasets"
            )
        return f"{corpus_cfg.name}-local", lambda: corpus.read_local(local_dir)
    if source == "datasets" or (source == "auto" and corpus.has_hf_cache(corpus_cfg.cache_dir)):
        return corpus_cfg.dataset, lambda: corpus.read_hf_wikitext(
            corpus_cfg.dataset, corpus_cfg.split, cache_dir=corpus_cfg.cache_dir
        )
    if source in ("auto", "sample"):
        if source == "auto" and str(local_dir) not in _WARNED:
            _WARNED.add(str(local_dir))  # once per process, not at every look-up
            log.warning(
                "no corpus text in the data root (%s, nor WikiText cached in %s): the key "
                "statistics use the small sample bundled in data/samples/%s (run `make data` "
                "with network or set ROME_DATA=... for the full corpus)",
                local_dir,
                corpus_cfg.cache_dir,
                corpus_cfg.sample,
            )
        return corpus_cfg.sample_name, lambda: corpus.read_sample(corpus_cfg.sample)
    raise ValueError(f"corpus.source must be auto, local, datasets or sample, got {source!r}")


def stats_key(cfg: DictConfig, lm: LoadedModel, layer: int) -> tuple[StatsKey, TextSource]:
    """The cache key of C at `layer` for `cfg.corpus` and the budget in `cfg.editor.mom2`."""
    name, texts = open_corpus(cfg.corpus)
    budget = cfg.editor.mom2
    key = StatsKey.of(
        lm,
        layer,
        name,
        max_samples=budget.max_samples,
        max_tokens=budget.max_tokens,
        max_length=int(budget.max_length),
        accumulate_dtype=getattr(torch, budget.dtype),
    )
    return key, texts


def key_statistics(
    cfg: DictConfig,
    lm: LoadedModel,
    layer: int,
    *,
    shard: tuple[int, int] | None = None,
    progress: bool = True,
) -> SecondMoment:
    """C at `layer` from the cache, or computed (and cached) from the configured corpus."""
    key, texts = stats_key(cfg, lm, layer)
    return cached_second_moment(
        lm,
        key,
        texts,
        cache_dir=cfg.paths.cache,
        batch_size=int(cfg.editor.mom2.batch_size),
        shard=shard,
        progress=progress,
    )


def context_templates(cache_dir: str | Path, lm: LoadedModel, hparams: RomeHparams) -> list[str]:
    """The model's own context templates for these settings, generated once per model."""
    settings = {
        "lengths": hparams.context_templates,
        "seeds": hparams.context_seeds,
        "top_k": hparams.context_top_k,
        "seed": hparams.context_seed,
        "dtype": str(lm.dtype),
    }
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    path = Path(cache_dir) / "templates" / lm.name / f"{digest}.json"
    with file_lock(path.with_suffix(".lock")):
        if path.exists():
            return files.read_json(path)["templates"]
        templates = generate_context_templates(
            lm,
            hparams.context_templates,
            seeds=hparams.context_seeds,
            top_k=hparams.context_top_k,
            seed=hparams.context_seed,
        )
        files.write_json(path, {"settings": settings, "templates": templates})
    log.info("context templates for %s cached at %s", lm.name, path)
    return templates


class Editor:
    """Updates for cases under the configured editor (`none` gives no updates)."""

    def __init__(self, cfg: DictConfig, lm: LoadedModel):
        self.name = cfg.editor.name
        self.lm = lm
        if self.name == "none":
            return
        self.hparams = rome_hparams(cfg.editor, lm.name)
        self.second_moment = key_statistics(cfg, lm, self.hparams.layer)
        self.templates = context_templates(cfg.paths.cache, lm, self.hparams)

    def requests(self, cases: Sequence[CounterfactCase]) -> list[EditRequest]:
        return [
            EditRequest(c.template, c.subject, c.target_new, target_true=c.target_true, id=c.id)
            for c in cases
        ]

    def updates(self, cases: Sequence[CounterfactCase]) -> list[EditResult | None]:
        if self.name == "none":
            return [None] * len(cases)
        return compute_updates(
            self.lm,
            self.requests(cases),
            self.hparams,
            second_moment=self.second_moment,
            context_templates=self.templates,
            batch_size=len(cases),
        )

    def edit_sequentially(
        self,
        cases: Sequence[CounterfactCase],
        on_checkpoint: Callable[[int, list[EditResult]], None],
    ) -> list[EditResult]:
        """Edit the cases one after another into the model, calling `on_checkpoint(done, results)`
        after each; the model's weights are restored exactly afterwards."""
        with preserved_weights(self.lm, [self.hparams.layer]):
            return rome.edit_sequentially(
                self.lm,
                self.requests(cases),
                self.hparams,
                second_moment=self.second_moment,
                context_templates=self.templates,
                checkpoint_every=1,
                on_checkpoint=on_checkpoint,
            )
