"""Editors from configuration: the registry of editors, their hyperparameters, key statistics
and context templates, and the protocols applied to CounterFact cases.

The stage-layer side of editing. It reads `cfg.editor`, `cfg.corpus` and `cfg.paths` and keeps
files in `paths.cache`; the editors themselves (`pipeline.core.editing`) stay plain algorithms.
A new editor is one entry in `EDITORS` and a `conf/editor/<name>.yaml`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from pipeline.app.results import ValueCache
from pipeline.core import files
from pipeline.core.editing import sequential
from pipeline.core.editing.alphaedit import AlphaEdit, AlphaEditHparams
from pipeline.core.editing.editor import Editor, JointEdit
from pipeline.core.editing.emmet import Emmet, EmmetHparams
from pipeline.core.editing.ft import FineTune, FtHparams
from pipeline.core.editing.kn import KnHparams, KnowledgeNeurons
from pipeline.core.editing.memit import Memit, MemitHparams
from pipeline.core.editing.requests import EditRequest, EditResult
from pipeline.core.editing.rome import Rome, RomeHparams
from pipeline.core.editing.templates import templates_for
from pipeline.core.editing.updates import preserved_weights
from pipeline.core.files import file_lock
from pipeline.core.models import LoadedModel, identity_of
from pipeline.core.second_moment import SecondMoment, StatsKey, cached_second_moments
from pipeline.core.tokens import encode
from pipeline.data import corpus
from pipeline.data.records import CounterfactCase

log = logging.getLogger(__name__)

TextSource = Callable[[], Iterable[str]]


@dataclass(frozen=True)
class EditorSpec:
    """How a `conf/editor/<name>.yaml` becomes an editor: its hyperparameter class, the field
    that takes the edited layer(s), and how to build it from its statistics and templates."""

    hparams: type
    layer_field: str | None  # "layer" (one int), "layers" (a list), None: every layer (KN)
    build: Callable[..., Editor]  # (lm, hparams, statistics: layer -> C, templates) -> Editor
    needs_keys: bool = True  # key statistics C and context templates (FT and KN need neither)


def _rome(lm, hp, statistics, templates, batch_size):
    return Rome(
        lm,
        hp,
        second_moment=statistics(hp.layer),
        context_templates=templates,
        batch_size=batch_size,
    )


def _memit_family(kind: type[Memit]):
    def build(lm, hp, statistics, templates, batch_size):
        moments = {layer: statistics(layer) for layer in hp.layers}
        return kind(
            lm, hp, second_moments=moments, context_templates=templates, batch_size=batch_size
        )

    return build


def _fine_tune(lm, hp, statistics, templates, batch_size):
    return FineTune(lm, hp)


def _knowledge_neurons(lm, hp, statistics, templates, batch_size):
    return KnowledgeNeurons(lm, hp)


EDITORS: dict[str, EditorSpec] = {
    "rome": EditorSpec(RomeHparams, "layer", _rome),
    "r-rome": EditorSpec(RomeHparams, "layer", _rome),
    "rome-reference": EditorSpec(RomeHparams, "layer", _rome),
    "memit": EditorSpec(MemitHparams, "layers", _memit_family(Memit)),
    "emmet": EditorSpec(EmmetHparams, "layers", _memit_family(Emmet)),
    "alphaedit": EditorSpec(AlphaEditHparams, "layers", _memit_family(AlphaEdit)),
    "ft": EditorSpec(FtHparams, "layer", _fine_tune, needs_keys=False),
    "ft-l": EditorSpec(FtHparams, "layer", _fine_tune, needs_keys=False),
    "kn": EditorSpec(KnHparams, None, _knowledge_neurons, needs_keys=False),
}
# Keys of an editor config read here, not by the algorithm.
STAGE_KEYS = {"name", "layer", "layers", "per_model", "batch_size", "mom2"}


def spec(editor: DictConfig) -> EditorSpec:
    if editor.name not in EDITORS:
        raise ValueError(f"unknown editor '{editor.name}'; known: none, {', '.join(EDITORS)}")
    return EDITORS[editor.name]


def edit_layers(editor: DictConfig, model_name: str) -> list[int]:
    """`editor.layer` (an int, or a list for multi-layer editors) if set, else the editor's
    preset for this model in `editor.layers`."""
    chosen = editor.get("layer")
    if chosen is None and editor.get("layers") == "all":
        raise ValueError(
            f"editor '{editor.name}' chooses its neurons in every layer: it has no edit layer"
        )
    if chosen is None:
        presets = editor.get("layers") or {}
        if model_name not in presets:
            raise ValueError(
                f"editor '{editor.name}' has no layer preset for model '{model_name}' "
                f"(presets: {sorted(presets)}); choose with editor.layer=N (or a list)"
            )
        chosen = presets[model_name]
    return (
        [int(x) for x in chosen] if isinstance(chosen, (list, tuple, ListConfig)) else [int(chosen)]
    )


def edit_layer(editor: DictConfig, model_name: str) -> int:
    """The single layer a one-layer editor (ROME, r-ROME) edits."""
    layers = edit_layers(editor, model_name)
    if len(layers) != 1:
        raise ValueError(f"editor '{editor.name}' edits one layer, got {layers}")
    return layers[0]


def editor_hparams(editor: DictConfig, model_name: str):
    """The editor's hyperparameters from its config; unknown keys there are an error."""
    kind = spec(editor)
    fields = {f.name for f in dataclasses.fields(kind.hparams)}
    settings = OmegaConf.to_container(editor, resolve=True)
    unknown = set(settings) - fields - STAGE_KEYS
    if unknown:
        raise ValueError(f"unknown editor settings {sorted(unknown)} in editor '{editor.name}'")
    values = {key: value for key, value in settings.items() if key in fields - {"layer", "layers"}}
    if kind.layer_field is None:  # the editor chooses its layers (KN: every layer)
        if editor.get("layer") is not None or editor.get("layers") not in (None, "all"):
            raise ValueError(
                f"editor '{editor.name}' chooses its neurons in every layer; "
                "editor.layer / editor.layers do not apply"
            )
        return kind.hparams(**values)
    layers = edit_layers(editor, model_name)
    values[kind.layer_field] = (
        layers if kind.layer_field == "layers" else edit_layer(editor, model_name)
    )
    return kind.hparams(**values)


def rome_hparams(editor: DictConfig, model_name: str) -> RomeHparams:
    """RomeHparams from `conf/editor/{rome,r-rome}.yaml`."""
    if spec(editor).hparams is not RomeHparams:
        raise ValueError(f"editor '{editor.name}' is not a ROME editor")
    return editor_hparams(editor, model_name)


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
    layers: int | Sequence[int],
    *,
    shard: tuple[int, int] | None = None,
    progress: bool = True,
) -> dict[int, SecondMoment]:
    """C at each of `layers` from the cache, the missing ones computed (and cached) from the
    configured corpus in one pass; keyed by layer (counted from 0)."""
    layers = [layers] if isinstance(layers, int) else list(layers)
    keys, sources = zip(*(stats_key(cfg, lm, layer) for layer in layers), strict=True)
    texts = sources[0]  # one corpus for every layer
    return cached_second_moments(
        lm,
        keys,
        texts,
        cache_dir=cfg.paths.cache,
        batch_size=int(cfg.editor.mom2.batch_size),
        shard=shard,
        progress=progress,
    )


def context_templates(cache_dir: str | Path, lm: LoadedModel, hparams: RomeHparams) -> list[str]:
    """The model's own context templates for these settings, generated once per model and
    cached with a checksum (`files.sealed`): a damaged file is named and generated again."""
    settings = {
        "lengths": hparams.context_templates,
        "seeds": hparams.context_seeds,
        "top_k": hparams.context_top_k,
        "seed": hparams.context_seed,
        "dtype": str(lm.dtype),
        "model": identity_of(lm),  # the weights, not the name: a model's own text
    }
    if getattr(hparams, "context_length_includes_seed", False):  # older entries keep their key
        settings["length_includes_seed"] = True
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    path = Path(cache_dir) / "templates" / lm.name / f"{digest}.json"
    with file_lock(path.with_suffix(".lock")):
        if path.exists():
            try:
                entry = files.read_json(path)
            except (ValueError, OSError) as error:  # truncated, or not JSON
                entry = {"error": str(error)}
            if files.intact(entry):
                return entry["templates"]
            log.warning(
                "%s fails its checksum (%s); generating the templates again",
                path,
                entry.get("error", "damaged, or written before the cache had checksums"),
            )
        templates = templates_for(lm, hparams)
        files.write_json(path, files.sealed({"settings": settings, "templates": templates}))
    log.info("context templates for %s cached at %s", lm.name, path)
    return templates


class CaseEditor:
    """The configured editor applied to CounterFact cases (`none`: no edits), with the three
    protocols: independent, mass and sequential."""

    def __init__(self, cfg: DictConfig, lm: LoadedModel):
        self.name = cfg.editor.name
        self.lm = lm
        self.editor: Editor | None = None
        if self.name == "none":
            return
        kind = spec(cfg.editor)
        self.hparams = editor_hparams(cfg.editor, lm.name)
        templates = (
            context_templates(cfg.paths.cache, lm, self.hparams) if kind.needs_keys else None
        )

        moments: dict[int, SecondMoment] = {}

        def statistics(layer: int) -> SecondMoment:
            if not kind.needs_keys:
                raise RuntimeError(f"editor '{self.name}' uses no key statistics")
            layer %= lm.n_layers
            if layer not in moments:  # every edit layer in one pass over the corpus
                wanted = {x % lm.n_layers for x in edit_layers(cfg.editor, lm.name)} | {layer}
                moments.update(key_statistics(cfg, lm, sorted(wanted - set(moments))))
            return moments[layer]

        batch_size = int(cfg.editor.get("batch_size") or 8)
        self.templates = templates
        self.editor = kind.build(lm, self.hparams, statistics, templates, batch_size)
        if hasattr(self.editor, "value_store"):  # z shared by runs and editors (results.py)
            self.editor.value_store = ValueCache(
                Path(cfg.paths.cache) / "values" / f"{lm.name}-{cfg.dtype}"
            )

    def prefix_tokens(self) -> int:
        """Tokens the editor puts before a prompt: its longest context template's text."""
        if self.editor is None or not getattr(self, "templates", None):
            return 0
        return max(len(encode(self.lm.tokenizer, t.replace("{}", ""))) for t in self.templates)

    @staticmethod
    def requests(cases: Sequence[CounterfactCase]) -> list[EditRequest]:
        return [
            EditRequest(c.template, c.subject, c.target_new, target_true=c.target_true, id=c.id)
            for c in cases
        ]

    def _indexed(self, cases):
        return list(enumerate(self.requests(cases)))

    def updates(self, cases: Sequence[CounterfactCase]) -> list[EditResult | None]:
        """Each case's own update, computed on the model as it is (independent mode)."""
        if self.editor is None:
            return [None] * len(cases)
        return self.editor.independent(self.lm, self._indexed(cases))

    def mass(self, cases: Sequence[CounterfactCase]) -> JointEdit:
        """Updates writing every case at once (mass mode), not applied."""
        if self.editor is None:
            raise ValueError("mass mode needs an editor")
        return self.editor.joint(self.lm, self._indexed(cases))

    def edit_sequentially(
        self,
        cases: Sequence[CounterfactCase],
        on_checkpoint: Callable[[int, list[EditResult]], None],
        batch_size: int = 1,
        resume: dict | None = None,
    ) -> list[EditResult]:
        """Write the cases into the model `batch_size` at a time, calling
        `on_checkpoint(done, results)` after each (done counts every case in the model, results
        are this call's); the weights are restored exactly after. `resume` (a `snapshot()`
        taken after the first `resume["done"]` cases) puts that model and editor state back and
        goes on from there."""
        if self.editor is None:
            raise ValueError("sequential mode needs an editor")
        start = resume["done"] if resume else 0
        with preserved_weights(self.lm, self.editor.layers):
            if resume:
                with torch.no_grad():
                    for layer, weight in resume["weights"].items():
                        self.lm.mlp_out_weight(layer).copy_(weight)
                self.editor.load_state_dict(resume["editor"])
            return sequential.edit_sequentially(
                self.lm,
                self.requests(cases[start:]),
                self.editor,
                batch_size=batch_size,
                checkpoint_every=1,
                on_checkpoint=lambda done, results: on_checkpoint(start + done, results),
            )

    def snapshot(self, done: int) -> dict:
        """The model's edited weights and the editor's state after `done` sequential cases."""
        assert self.editor is not None
        return {
            "done": done,
            "weights": {
                layer % self.lm.n_layers: self.lm.mlp_out_weight(layer).detach().clone()
                for layer in self.editor.layers
            },
            "editor": self.editor.state_dict(),
        }
