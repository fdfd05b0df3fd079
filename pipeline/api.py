"""Editing from Python in one call: load a model, edit facts into it, look, restore or save.

    from pipeline.api import load

    model = load("smollm2-135m")              # a conf/model name, a local directory or a hub id
    request = {"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux",
               "target_new": "English", "target_true": "French"}
    with model.edit(request, editor="rome") as edit:   # any editor, its settings by keyword
        print(edit.generate())                # before and after, side by side
        print(edit.scores()[0]["post"]["metrics"])
    # the weights are back, bit for bit

    edit = model.edit([request], editor="memit", layers=[2, 3, 4])
    edit.save("out/darrieux")                 # AutoModelForCausalLM.from_pretrained loads it
    edit.restore()

The configuration is the `edit` stage's (conf/edit.yaml: the model, editor, corpus and paths
groups every stage composes), so a model loads as the stages load it (the same registry, the
converted-model cache, offline behaviour) and an editor finds the key statistics the stages cached
under `paths.cache` (`python -m pipeline.stats`), computing the missing ones with a progress bar
from the same corpus, the bundled sample where the data root has none. Importing this module
needs no Hydra: Hydra composes the configuration when `load` is called.

Requests and their checks, the edit and what it offers are `pipeline.app.edited_model`'s.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from pipeline.app.edited_model import EditedModel, PendingEdit
from pipeline.app.editors import check_settings, spec
from pipeline.app.schema import ConfigError, validate_config
from pipeline.core.models import LoadedModel, load_model
from pipeline.core.scoring import generate

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"

__all__ = ["EditedModel", "Model", "configure", "load"]


def compose(overrides: Sequence[str] = ()) -> DictConfig:
    """conf/edit.yaml composed with Hydra's `overrides` (`model=tiny-gpt2`, `editor=memit`), as
    `python -m pipeline.edit` composes it, outside any Hydra application."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():  # inside a Hydra app: compose with its instance
        return hydra_compose(config_name="edit", overrides=list(overrides))
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name="edit", overrides=list(overrides))


def model_choice(name_or_path: str | Path) -> tuple[list[str], dict[str, Any] | None]:
    """How `name_or_path` picks the model: a conf/model name as an override, else a spec for a
    local directory (`model.path`) or a Hugging Face hub id (`owner/name`)."""
    text = str(name_or_path)
    if (CONF_DIR / "model" / f"{text}.yaml").exists():
        return [f"model={text}"], None
    path = Path(text).expanduser()
    if path.is_dir():
        return [], {"name": path.resolve().name, "source": "hub", "path": str(path.resolve())}
    if "/" in text and not path.exists():
        return [], {"name": text.replace("/", "--"), "source": "hub", "hf_id": text, "path": None}
    known = sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))
    raise ValueError(
        f"{text!r} is neither a model config ({', '.join(known)}), a local directory, nor a "
        "Hugging Face hub id (owner/name)"
    )


def configure(
    name_or_path: str | Path,
    editor: str | None = None,
    hparams: Mapping[str, Any] | None = None,
    *,
    device: str = "auto",
    dtype: str = "float32",
    seed: int = 0,
    settings: Mapping[str, Any] | None = None,
    n_layers: int | None = None,
) -> DictConfig:
    """The configuration of `load` and `Model.edit`, checked: conf/edit.yaml with the model, the
    editor (conf/editor/<editor>.yaml), `settings` (any dotted key), then `hparams`. An
    editor's setting goes by its name (`v_lr=0.1`), the edited layer(s) as `layer=` or
    `layers=` (either: the stages' `editor.layer`), the statistics' budget as `mom2={...}`."""
    if editor not in (None, "none"):
        spec(OmegaConf.create({"name": editor}))  # an unknown name: the registry's error
    overrides, model_spec = model_choice(name_or_path)
    cfg = compose(overrides + ([f"editor={editor}"] if editor else []))
    OmegaConf.set_struct(cfg, False)  # an unknown editor setting is named by `check_settings`
    if model_spec is not None:
        cfg.model = model_spec
    cfg.device, cfg.dtype, cfg.seed = device, dtype, int(seed)
    for key, value in (settings or {}).items():
        OmegaConf.update(cfg, key, value, merge=True)
    for key, value in (hparams or {}).items():  # the edit's own settings win over `settings`
        key = "layer" if key == "layers" else key
        OmegaConf.update(cfg, f"editor.{key}", value, merge=True)
    try:
        validate_config(cfg)
        if editor is not None:  # a model loaded by directory has no editor's layer preset
            check_settings(cfg, n_layers)
    except ConfigError as error:  # a stage exits; a library raises
        hint = "\n(from Python, `editor.<setting>=...` is Model.edit(..., <setting>=...))"
        raise ValueError(str(error.code) + (hint if editor else "")) from None
    return cfg


def load(
    name_or_path: str | Path,
    *,
    device: str = "auto",
    dtype: str = "float32",
    seed: int = 0,
    settings: Mapping[str, Any] | None = None,
) -> Model:
    """Load a model for editing: a conf/model name (`smollm2-135m`, `gpt2-xl`, `tiny-gpt2`), a
    local directory in `save_pretrained`'s layout (an edited model saved here, too) or a hub
    id. `settings`: any other setting of conf/edit.yaml by dotted key, e.g.
    `{"paths.cache": "/scratch/cache", "corpus.local_dir": "/data/wiki"}`."""
    options = dict(device=device, dtype=dtype, seed=seed, settings=dict(settings or {}))
    cfg = configure(name_or_path, **options)
    directory = (model_choice(name_or_path)[1] or {}).get("path")
    if directory:  # absolute: an edit later finds it from any working directory
        name_or_path = directory
    lm = load_model(
        cfg.model, device=cfg.device, dtype=cfg.dtype, cache_dir=cfg.paths.cache, seed=cfg.seed
    )
    return Model(lm, name_or_path, options)


class Model:
    """A loaded model and how it was loaded (`load`)."""

    def __init__(self, lm: LoadedModel, name_or_path: str | Path, options: dict[str, Any]):
        self.lm, self.name_or_path, self.options = lm, name_or_path, options
        self._active: EditedModel | None = None

    def __repr__(self) -> str:
        return f"Model({self.lm.name!r}, {self.lm.n_layers} layers, {self.lm.source})"

    def edit(self, requests: Any, editor: str = "rome", **hparams: Any) -> EditedModel:
        """Edit `requests` into the model with `editor` (any of the registry's) and its
        settings by keyword; they are checked as `evaluate` checks its records, and refused
        (`RecordError`, naming the request and field) before anything is computed. Returns the
        edited model, a context manager that restores the weights on leaving."""
        if self._active is not None and self._active.active:
            raise RuntimeError(
                "the model holds an edit already: restore it (or leave its `with` block) first"
            )
        cfg = configure(
            self.name_or_path, editor, hparams, n_layers=self.lm.n_layers, **self.options
        )
        self._active = PendingEdit.check(cfg, self.lm, requests).apply()
        return self._active

    def generate(
        self, prompts: Sequence[str] | str, *, max_new_tokens: int = 20, top_k: int = 1, seed=0
    ) -> list[str]:
        """Continuations of the model as it is now (`EditedModel.generate` shows both)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        return generate(self.lm, prompts, max_new_tokens=max_new_tokens, top_k=top_k, seed=seed)
