"""Editors from configuration: the registry of editors, their hyperparameters, key statistics
and context templates, and the protocols applied to CounterFact cases.

The stage-layer side of editing. It reads `cfg.editor`, `cfg.corpus` and `cfg.paths` and keeps
files in `paths.cache`; the editors themselves (`pipeline.core.editing`) stay plain algorithms.
A new editor is one entry in `EDITORS` and a `conf/editor/<name>.yaml`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from pipeline.app.corpora import TextSource, statistics_corpus
from pipeline.app.results import ValueCache
from pipeline.app.schema import ConfigError
from pipeline.core import files
from pipeline.core.editing import sequential
from pipeline.core.editing.alphaedit import AlphaEdit, AlphaEditHparams
from pipeline.core.editing.editor import Editor, JointEdit
from pipeline.core.editing.emmet import Emmet, EmmetHparams
from pipeline.core.editing.ft import FineTune, FtHparams
from pipeline.core.editing.kn import KnHparams, KnowledgeNeurons
from pipeline.core.editing.memit import Memit, MemitHparams
from pipeline.core.editing.ranges import settings_text
from pipeline.core.editing.requests import EditRequest, EditResult
from pipeline.core.editing.rome import Rome, RomeHparams
from pipeline.core.editing.templates import templates_for
from pipeline.core.editing.updates import NonFiniteUpdate, check_finite, preserved_weights
from pipeline.core.files import file_lock
from pipeline.core.models import LoadedModel, declared_layers, identity_of, layer_problems
from pipeline.core.second_moment import SecondMoment, StatsKey, cached_second_moments
from pipeline.core.tokens import encode
from pipeline.data.records import CounterfactCase

log = logging.getLogger(__name__)


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
    "memit-reference": EditorSpec(MemitHparams, "layers", _memit_family(Memit)),
    "emmet-reference": EditorSpec(EmmetHparams, "layers", _memit_family(Emmet)),
    "alphaedit-reference": EditorSpec(AlphaEditHparams, "layers", _memit_family(AlphaEdit)),
    "ft": EditorSpec(FtHparams, "layer", _fine_tune, needs_keys=False),
    "ft-l": EditorSpec(FtHparams, "layer", _fine_tune, needs_keys=False),
    "kn": EditorSpec(KnHparams, None, _knowledge_neurons, needs_keys=False),
}
# Keys of an editor config read here, not by the algorithm.
STAGE_KEYS = {"name", "layer", "layers", "layers_by_model", "per_model", "batch_size", "mom2"}


def spec(editor: DictConfig) -> EditorSpec:
    if editor.name not in EDITORS:
        raise ValueError(f"unknown editor '{editor.name}'; known: none, {', '.join(EDITORS)}")
    return EDITORS[editor.name]


def chosen_layers(editor: DictConfig) -> tuple[str, object] | None:
    """The edit layer(s) the user set, with the key that set it: `editor.layer` (an int, or a
    list for multi-layer editors) or `editor.layers` (a list); None: the model's preset."""
    given = {
        key: editor.get(key)
        for key in ("layer", "layers")
        if editor.get(key) is not None and editor.get(key) != "all"
    }
    if len(given) > 1:
        raise ValueError(
            f"editor '{editor.name}': editor.layer={given['layer']} and "
            f"editor.layers={given['layers']} both set; set one"
        )
    return next(iter(given.items()), None)


def edit_layers(editor: DictConfig, model_name: str) -> list[int]:
    """`editor.layer` or `editor.layers` if set, else the editor's preset for this model in
    `editor.layers_by_model`."""
    if editor.get("layer") is None and editor.get("layers") == "all":
        raise ValueError(
            f"editor '{editor.name}' chooses its neurons in every layer: it has no edit layer"
        )
    given = chosen_layers(editor)
    if given is None:
        presets = editor.get("layers_by_model") or {}
        if model_name not in presets:
            raise ValueError(
                f"editor '{editor.name}' has no layer preset for model '{model_name}' "
                f"(presets: {sorted(presets)}); choose with editor.layer=N (or a list)"
            )
        chosen = presets[model_name]
    else:
        chosen = given[1]
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


def layer_settings(cfg: DictConfig) -> dict[str, int | list[int]]:
    """Every layer a stage's config names, by the setting that names it: the statistics stage's
    `layers`, else the editor's edit layer(s) (`editor.layer` or `editor.layers`, or its
    preset for the model, `editor.layers_by_model.<model>`); and the layer `editor.v_loss_layer` reads the loss after."""
    found: dict[str, int | list[int]] = {}
    if cfg.get("layers") is not None:
        found["layers"] = [int(x) for x in cfg.layers]
    editor = cfg.get("editor")
    if editor is None or editor.name == "none":
        return found
    if spec(editor).layer_field is not None and "layers" not in found:
        model, given = cfg.model.name, chosen_layers(editor)
        if given is not None:
            name, value = f"editor.{given[0]}", given[1]
        else:
            name = f"editor.layers_by_model.{model}"
            value = (editor.get("layers_by_model") or {}).get(model)
        if value is not None:  # no preset: `editor_hparams` says so
            found[name] = [int(x) for x in value] if isinstance(value, ListConfig) else int(value)
    if editor.get("v_loss_layer") is not None:
        found["editor.v_loss_layer"] = int(editor.v_loss_layer)
    return found


def check_settings(cfg: DictConfig, n_layers: int | None = None) -> None:
    """The editor's settings and every layer the config names, checked before anything is
    loaded or written (`Run` calls this before the results directory exists): the
    hyperparameters as their classes check them, and each layer inside the model. `n_layers` is
    the model's; None reads it from the model's spec without loading the weights
    (`declared_layers`), and where that cannot tell, the loaded model is checked (`Run.
    load_model`), still before any statistics or templates are computed."""
    problems = []
    editor = cfg.get("editor")
    if editor is not None and editor.name != "none":
        try:
            editor_hparams(editor, cfg.model.name)
        except (ValueError, TypeError) as error:
            problems.append(f"editor '{editor.name}': {error}")
    layers = layer_settings(cfg) if not problems else {}
    if layers and n_layers is None:
        n_layers = declared_layers(cfg.model, cfg.paths.cache)
    if layers and n_layers is not None:
        problems += layer_problems(n_layers, layers)
    if problems:
        raise ConfigError(
            f"invalid configuration for model '{cfg.model.name}':\n  " + "\n  ".join(problems)
        )


def rome_hparams(editor: DictConfig, model_name: str) -> RomeHparams:
    """RomeHparams from `conf/editor/{rome,r-rome}.yaml`."""
    if spec(editor).hparams is not RomeHparams:
        raise ValueError(f"editor '{editor.name}' is not a ROME editor")
    return editor_hparams(editor, model_name)


def stats_key(cfg: DictConfig, lm: LoadedModel, layer: int) -> tuple[StatsKey, TextSource]:
    """The cache key of C at `layer` for `cfg.corpus` and the budget in `cfg.editor.mom2`:
    the text's content digest, not its name (`corpora.statistics_corpus`)."""
    text = statistics_corpus(cfg.corpus)
    budget = cfg.editor.mom2
    key = StatsKey.of(
        lm,
        layer,
        text.name,
        corpus_digest=text.digest,
        max_samples=budget.max_samples,
        max_tokens=budget.max_tokens,
        max_length=int(budget.max_length),
        accumulate_dtype=getattr(torch, budget.dtype),
    )
    return key, text.texts


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

    @contextlib.contextmanager
    def _finite(self, what: str | Callable[[], str]):
        """A non-finite update (a broken solve) stops the run naming `what` (the cases; a
        function: known only when it fails) and the settings the editor's algebra rests on,
        instead of being written or scored."""
        try:
            yield
        except NonFiniteUpdate as error:
            cases = what() if callable(what) else what
            settings = settings_text(self.hparams, type(self.hparams).RANGES)
            raise NonFiniteUpdate(
                f"editor '{self.name}', {cases}: {error}. The settings its update rests on: "
                f"{settings}"
            ) from None

    def updates(self, cases: Sequence[CounterfactCase]) -> list[EditResult | None]:
        """Each case's own update, computed on the model as it is (independent mode)."""
        if self.editor is None:
            return [None] * len(cases)
        results = self.editor.independent(self.lm, self._indexed(cases))
        for case, result in zip(cases, results, strict=True):
            with self._finite(f"case {case.id}"):
                check_finite(result.update if result.ok else None, "its update")
        return results

    def mass(self, cases: Sequence[CounterfactCase]) -> JointEdit:
        """Updates writing every case at once (mass mode), not applied."""
        if self.editor is None:
            raise ValueError("mass mode needs an editor")
        with self._finite(f"the {len(cases)} cases written at once ({_ids(cases)})"):
            edit = self.editor.joint(self.lm, self._indexed(cases))
            check_finite(edit.updates, "the joint update")
        return edit

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
        done = [start]  # cases in the model at the last checkpoint, for a failure's message

        def checkpoint(count: int, results: list[EditResult]) -> None:
            done[0] = start + count
            on_checkpoint(start + count, results)

        with (
            preserved_weights(self.lm, self.editor.layers),
            self._finite(lambda: f"the cases after the first {done[0]} ({_ids(cases[done[0] :])})"),
        ):
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
                on_checkpoint=checkpoint,
            )

    def weights_digest(self) -> str:
        """sha256 of the edited layers' weights as they are now, bit for bit: a sequential run
        replayed without its progress file checks with it that it has the model it scored."""
        assert self.editor is not None
        digest = hashlib.sha256()
        for layer in self.editor.layers:
            weight = self.lm.mlp_out_weight(layer).detach().cpu().contiguous().flatten()
            digest.update(weight.view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

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


def _ids(cases: Sequence[CounterfactCase], shown: int = 5) -> str:
    more = f", ... {len(cases) - shown} more" if len(cases) > shown else ""
    return "ids " + ", ".join(str(c.id) for c in cases[:shown]) + more
