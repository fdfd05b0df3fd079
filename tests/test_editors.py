"""Editors from configuration: presets, hyperparameters, cached templates (the corpus: in
test_corpora)."""

from __future__ import annotations

import dataclasses
import json

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from pipeline.app import editors
from pipeline.app.schema import ConfigError
from pipeline.core.editing.ft import FineTune, FtHparams
from pipeline.core.editing.memit import Memit, MemitHparams
from pipeline.core.editing.rome import Rome, RomeHparams
from pipeline.core.editing.updates import NonFiniteUpdate
from pipeline.data.records import load_counterfact
from tests.conftest import ROOT, tiny_model


def config(*overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("stats", overrides=list(overrides))


@pytest.mark.parametrize(
    ("model", "layer"), [("gpt2-xl", 17), ("gpt-j-6b", 5), ("smollm2-135m", 6)]
)
def test_layer_presets(model, layer):
    cfg = config(f"model={model}")
    assert editors.rome_hparams(cfg.editor, cfg.model.name).layer == layer


def test_rome_and_r_rome_differ_only_in_the_keys():
    rome_cfg, r_rome_cfg = config("editor=rome"), config("editor=r-rome")
    rome_hp = editors.rome_hparams(rome_cfg.editor, "gpt2-xl")
    r_rome_hp = editors.rome_hparams(r_rome_cfg.editor, "gpt2-xl")
    assert not rome_hp.consistent_keys and r_rome_hp.consistent_keys
    assert RomeHparams(**{**vars(r_rome_hp), "consistent_keys": False}) == rome_hp
    # The YAML holds the paper's values, which are also the dataclass defaults.
    assert rome_hp == RomeHparams(layer=17)


def test_bad_editor_settings_are_named():
    cfg = config("model=gpt2")
    with pytest.raises(ValueError, match="no layer preset for model 'gpt2'"):
        editors.rome_hparams(cfg.editor, cfg.model.name)
    assert editors.rome_hparams(config("model=gpt2", "editor.layer=3").editor, "gpt2").layer == 3
    with open_dict(cfg.editor):
        cfg.editor.v_learning_rate = 1.0
    with pytest.raises(ValueError, match="v_learning_rate"):
        editors.rome_hparams(cfg.editor, "gpt2-xl")


def test_context_templates_are_generated_once_per_model(tmp_path, monkeypatch):
    lm = tiny_model("tiny-gpt2")
    hp = RomeHparams(layer=1, context_templates=((3, 2),))
    first = editors.context_templates(tmp_path, lm, hp)
    assert len(first) == 3 and first[0] == "{}"

    def fail(*args, **kwargs):
        raise AssertionError("templates generated again")

    monkeypatch.setattr(editors, "templates_for", fail)
    assert editors.context_templates(tmp_path, lm, hp) == first
    with pytest.raises(AssertionError):
        editors.context_templates(tmp_path, lm, RomeHparams(layer=1, context_seed=1))


KEY_VALUE = ["rome", "r-rome", "memit", "emmet", "alphaedit"]
REFERENCE = ["rome-reference", "memit-reference", "emmet-reference", "alphaedit-reference"]


@pytest.mark.parametrize("name", KEY_VALUE + REFERENCE)
def test_every_editor_config_builds_its_hyperparameters(name):
    cfg = config(f"editor={name}", "model=gpt2-xl")
    hp = editors.editor_hparams(cfg.editor, "gpt2-xl")
    assert type(hp) is editors.EDITORS[name].hparams
    switches = (hp.kl_at_subject, hp.early_stop_on_total, hp.context_length_includes_seed)
    # The authors' code's choices where it departs from the paper: all three, or none.
    assert all(switches) if name in REFERENCE else not any(switches)
    if name in REFERENCE:  # otherwise the method itself, as its paper's preset has it
        base = editors.editor_hparams(
            config(f"editor={name[:-10]}", "model=gpt2-xl").editor, "gpt2-xl"
        )
        differ = {
            f.name for f in dataclasses.fields(hp) if getattr(hp, f.name) != getattr(base, f.name)
        }
        assert differ == {"kl_at_subject", "early_stop_on_total", "context_length_includes_seed"}


def test_multi_layer_presets_and_per_model_values_yield_to_the_command_line():
    memit = config("editor=memit", "model=gpt-j-6b").editor
    hp = editors.editor_hparams(memit, "gpt-j-6b")
    assert hp.layers == (3, 4, 5, 6, 7, 8)
    assert hp.mom2_update_weight == 15000.0 and hp.v_num_grad_steps == 25  # GPT-J's reference
    gpt2 = config("editor=memit", "model=gpt2-xl").editor
    assert editors.editor_hparams(gpt2, "gpt2-xl").mom2_update_weight == 2e4
    chosen = config(
        "editor=memit", "model=gpt-j-6b", "editor.mom2_update_weight=5", "editor.layer=[1,2]"
    )
    hp = editors.editor_hparams(chosen.editor, "gpt-j-6b")
    assert hp.mom2_update_weight == 5 and hp.layers == (1, 2)
    with pytest.raises(ValueError, match="edits one layer"):
        editors.edit_layer(config("editor=rome", "editor.layer=[1,2]").editor, "gpt2")


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("smollm2-135m", (1570.0, 1.64e-2, 1.61)),  # the tuning studies' (conf/tune/)
        ("gpt2-xl", (2e4, 0.02, 10.0)),  # the reference code's
    ],
)
def test_tuned_presets_are_per_model_and_the_reference_models_keep_the_authors(model, expected):
    memit = editors.editor_hparams(config("editor=memit", f"model={model}").editor, model)
    alpha = editors.editor_hparams(config("editor=alphaedit", f"model={model}").editor, model)
    assert (memit.mom2_update_weight, alpha.nullspace_threshold, alpha.l2) == expected
    chosen = config("editor=alphaedit", f"model={model}", "editor.l2=3")
    assert editors.editor_hparams(chosen.editor, model).l2 == 3  # the command line wins
    kn = editors.editor_hparams(config("editor=kn", f"model={model}").editor, model)
    tuned = (5.04e-2, 1.69, 6.74) if model == "smollm2-135m" else (0.2, 2.0, 1.0)
    assert (kn.adaptive_threshold, kn.erase_scale, kn.write_scale) == tuned


def test_editor_layers_is_the_list_a_user_sets_and_the_presets_are_layers_by_model():
    """`editor.layers` held the per-model preset map, so `editor.layers=[0,1]` replaced the map
    with a list and the run stopped ('no layer preset'); the map is `layers_by_model` now."""
    memit = config("editor=memit", "model=gpt-j-6b", "editor.layers=[0,1]").editor
    assert editors.editor_hparams(memit, "gpt-j-6b").layers == (0, 1)
    assert editors.edit_layers(config("editor=rome", "editor.layers=[3]").editor, "gpt2") == [3]
    preset = config("editor=memit", "model=gpt-j-6b").editor
    assert preset.layers is None and list(preset.layers_by_model["gpt-j-6b"]) == [3, 4, 5, 6, 7, 8]
    both = config("editor=memit", "editor.layer=[1]", "editor.layers=[0,1]").editor
    with pytest.raises(ValueError, match="both set; set one"):
        editors.edit_layers(both, "gpt-j-6b")
    found = editors.layer_settings(evaluate_config("editor=memit", "editor.layers=[0,2]"))
    assert found == {"editor.layers": [0, 2], "editor.v_loss_layer": -1}  # both checked


def test_context_templates_of_another_model_under_the_same_name_are_its_own(tmp_path, monkeypatch):
    hp = RomeHparams(layer=1, context_templates=((3, 2),))
    editors.context_templates(tmp_path, tiny_model("tiny-gpt2"), hp)
    calls = []
    real = editors.templates_for
    monkeypatch.setattr(editors, "templates_for", lambda *a, **k: calls.append(1) or real(*a, **k))
    editors.context_templates(tmp_path, tiny_model("tiny-gpt2", seed=1), hp)
    assert calls == [1]  # not the seed-0 model's text


def evaluate_config(*overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("evaluate", overrides=["model=tiny-gpt2", *overrides])


ONE_LAYER = ["ft", "ft-l", "rome", "rome-reference", "r-rome"]
LAYER_LISTS = ["memit", "emmet", "alphaedit"]


@pytest.mark.parametrize(
    ("editor", "layer"),
    [*((e, "4") for e in ONE_LAYER), *((e, "[0,4]") for e in LAYER_LISTS), ("kn", "4")],
)
def test_every_editor_refuses_a_layer_outside_the_model_before_loading_it(editor, layer):
    """MEMIT's [0, 4] on a 4-layer model edited layer 0 alone (4 mod 4) under a config and a
    results directory saying [0, 4]; now every editor stops on the setting, from the model's
    spec (tiny-gpt2's `arch`), before any weights, statistics or results directory."""
    editors.check_settings(evaluate_config(f"editor={editor}"))  # the presets are in range
    with pytest.raises(ConfigError, match=r"editor.layer.*(outside the model's 4 layers|apply)"):
        editors.check_settings(evaluate_config(f"editor={editor}", f"editor.layer={layer}"))


def test_negative_layers_count_from_the_end_but_may_not_name_a_block_twice():
    editors.check_settings(evaluate_config("editor=memit", "editor.layer=[-2,-1]"))
    with pytest.raises(ConfigError, match="names one of the model's 4 layers twice"):
        editors.check_settings(evaluate_config("editor=memit", "editor.layer=[3,-1]"))
    with pytest.raises(ConfigError, match=r"editor.v_loss_layer=4: layer 4 is outside"):
        editors.check_settings(evaluate_config("editor=rome", "editor.v_loss_layer=4"))
    with pytest.raises(ConfigError, match=r"^invalid.*\n  layers=\[1, -5\]: layer -5 is outside"):
        editors.check_settings(config("model=tiny-llama", "layers=[1,-5]"))  # the stats stage


def test_the_loaded_models_depth_is_checked_where_the_spec_cannot_tell_it(tmp_path):
    cfg = evaluate_config("editor=rome", "editor.layer=4", "model.arch.n_layer=6")
    editors.check_settings(cfg)  # the spec says 6 layers
    with pytest.raises(ConfigError, match="outside the model's 4 layers"):
        editors.check_settings(cfg, n_layers=tiny_model("tiny-gpt2").n_layers)


def test_the_editors_themselves_refuse_layers_outside_the_model():
    lm = tiny_model("tiny-gpt2")
    with pytest.raises(ValueError, match=r"layers=\(0, 4\): layer 4 is outside"):
        Memit(lm, MemitHparams(layers=(0, 4)), second_moments={})
    with pytest.raises(ValueError, match="layer=4: layer 4 is outside"):
        Rome(lm, RomeHparams(layer=4), second_moment=None, context_templates=["{}"])
    with pytest.raises(ValueError, match="layer=-5: layer -5 is outside"):
        FineTune(lm, FtHparams(layer=-5))


@pytest.mark.parametrize(
    ("editor", "setting"),
    [("memit", "editor.layer=[0,4]"), ("rome", "editor.mom2_update_weight=0")],
)
def test_a_bad_setting_stops_the_run_before_any_side_effect(tmp_path, editor, setting):
    """Both used to fail (or not) after the model loaded, the wrapped layer's statistics were
    computed and cached and the results directory was written; ROME's λ = 0 died in
    linalg.cholesky naming no setting."""
    from tests.test_stages import run_stage

    done = run_stage(
        "evaluate",
        "model=tiny-gpt2",
        f"editor={editor}",
        setting,
        "data.limit=2",
        f"paths.results={tmp_path / 'results'}",
        f"paths.cache={tmp_path / 'cache'}",
        "editor.mom2.max_tokens=2000",
    )
    assert done.returncode != 0
    assert setting.split("=")[0].removeprefix("editor.") in done.stderr
    assert not (tmp_path / "cache").exists()  # no statistics, templates, nor the model's files
    assert {p.name for p in (tmp_path / "results").iterdir()} == {"logs"}  # Hydra's own log


@pytest.mark.parametrize(
    ("editor", "setting", "why"),
    [
        ("alphaedit", "l2=0", "singular at 0"),  # every update NaN, the run scored S=0 exit 0
        ("alphaedit", "nullspace_threshold=0", "P = 0 and every update is 0"),
        ("memit", "mom2_update_weight=0", "singular at 0"),  # update norms up to 3e18
        ("emmet", "mom2_update_weight=-1", "singular at 0"),
        ("emmet", "emmet_lambda=-0.1", "ridge"),
        ("memit", "clamp_norm_factor=0", "clamped to 0"),
        ("rome", "mom2_update_weight=0", "positive definite"),  # died in linalg.cholesky
        ("rome", "v_num_grad_steps=1", "δ = 0"),
        ("r-rome", "v_lr=0", "never moves"),
        ("rome-reference", "clamp_norm_factor=-1", "clamped to 0"),
        ("kn", "adaptive_threshold=1.5", "none is"),  # updates exactly zero, reported ok
        ("ft", "lr=0", "never moves"),
        ("ft-l", "norm_constraint=0", "every step is undone"),
    ],
)
def test_settings_that_break_the_algebra_are_refused_with_the_reason(editor, setting, why):
    name, value = setting.split("=")
    with pytest.raises(ConfigError, match=rf"editor '{editor}': {name}={value}\S* must be .*{why}"):
        editors.check_settings(evaluate_config(f"editor={editor}", f"editor.{setting}"))


SAMPLE_CASES = load_counterfact(ROOT / "data/samples/counterfact-edit_sample.json", limit=3).records


def test_a_non_finite_update_is_an_error_naming_the_case_and_the_settings(tmp_path):
    """AlphaEdit with α = 0 made every update NaN, and the run scored them (S=0.0, exit 0).
    The range check refuses α = 0 now; set behind its back, the NaN is still never scored."""
    cfg = evaluate_config(
        "editor=alphaedit",
        f"paths.cache={tmp_path}",
        "corpus.source=sample",
        "editor.mom2.max_tokens=3000",
        "editor.v_num_grad_steps=2",
        "editor.context_templates=[[3,1]]",
    )
    case_editor = editors.CaseEditor(cfg, tiny_model("tiny-gpt2"))
    case_editor.hparams.l2 = 0.0  # the editor's own hparams object
    first = SAMPLE_CASES[0].id
    with pytest.raises(NonFiniteUpdate, match=rf"alphaedit', case {first}: its update .*l2=0.0"):
        case_editor.updates(SAMPLE_CASES[:1])
    with pytest.raises(NonFiniteUpdate, match=r"the 2 cases written at once .*l2=0.0"):
        case_editor.mass(SAMPLE_CASES[:2])


def test_a_truncated_template_file_is_named_and_generated_again(tmp_path, caplog):
    """A truncated file ended the run with a bare JSONDecodeError naming no file."""
    lm = tiny_model("tiny-gpt2")
    hp = RomeHparams(layer=1, context_templates=((3, 2),))
    first = editors.context_templates(tmp_path, lm, hp)
    (path,) = (tmp_path / "templates").rglob("*.json")
    path.write_text(path.read_text()[:20])
    assert editors.context_templates(tmp_path, lm, hp) == first  # seeded: the same again
    assert f"{path} fails its checksum" in caplog.text
    assert json.loads(path.read_text())["templates"] == first  # rewritten whole
    entry = json.loads(path.read_text())
    entry["templates"][1] = "Changed. {}"  # a changed entry is not used either
    path.write_text(json.dumps(entry))
    assert editors.context_templates(tmp_path, lm, hp) == first
