"""Editors from configuration: presets, hyperparameters, corpus choice, cached templates."""

from __future__ import annotations

import json

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from pipeline.app import editors
from pipeline.core.editing.rome import RomeHparams
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


def test_corpus_source(tmp_path):
    empty = config(f"paths.data={tmp_path}", "corpus.source=local")
    with pytest.raises(FileNotFoundError, match="no corpus files"):
        editors.open_corpus(empty.corpus)
    # auto with nothing in the data root: the bundled sample, named as such.
    name, texts = editors.open_corpus(config(f"paths.data={tmp_path}").corpus)
    assert name == "wikitext-sample"
    assert next(iter(texts())).startswith("Robert Boulter is an English film")
    assert editors.open_corpus(config("corpus.source=sample").corpus)[0] == "wikitext-sample"
    # auto with WikiText cached by `datasets` in the data root (make data): that.
    (tmp_path / "hf_datasets" / "Salesforce___wikitext").mkdir(parents=True)
    assert editors.open_corpus(config(f"paths.data={tmp_path}").corpus)[0] == "wikitext-103-raw-v1"
    name, _ = editors.open_corpus(config(f"paths.data={tmp_path}", "corpus.source=datasets").corpus)
    assert name == "wikitext-103-raw-v1"
    # auto with local text in the data root: the local text, first.
    (tmp_path / "wikipedia").mkdir()
    (tmp_path / "wikipedia" / "a.txt").write_text("First paragraph of text.\n\nSecond paragraph.\n")
    name, texts = editors.open_corpus(config(f"paths.data={tmp_path}").corpus)
    assert name == "wikipedia-local"
    assert list(texts()) == ["First paragraph of text.", "Second paragraph."]
    with pytest.raises(ValueError, match="sample"):
        editors.open_corpus(config("corpus.source=web").corpus)


def test_the_sample_has_its_own_statistics_cache_key(tmp_path):
    lm = tiny_model("tiny-gpt2")
    sample, _ = editors.stats_key(config("model=tiny-gpt2", f"paths.data={tmp_path}"), lm, 1)
    (tmp_path / "wikipedia").mkdir()
    (tmp_path / "wikipedia" / "a.txt").write_text("Some text.\n")
    local, _ = editors.stats_key(config("model=tiny-gpt2", f"paths.data={tmp_path}"), lm, 1)
    assert sample.corpus == "wikitext-sample" and local.corpus == "wikipedia-local"
    assert "wikitext-sample" in str(sample.path(tmp_path))
    assert sample.path(tmp_path) != local.path(tmp_path)


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


@pytest.mark.parametrize(
    "name", ["rome", "r-rome", "rome-reference", "memit", "emmet", "alphaedit"]
)
def test_every_editor_config_builds_its_hyperparameters(name):
    cfg = config(f"editor={name}", "model=gpt2-xl")
    hp = editors.editor_hparams(cfg.editor, "gpt2-xl")
    assert type(hp) is editors.EDITORS[name].hparams
    if name == "rome-reference":  # the authors' code's choices where it departs from the paper
        assert hp.kl_at_subject and hp.early_stop_on_total and hp.context_length_includes_seed


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


def test_context_templates_of_another_model_under_the_same_name_are_its_own(tmp_path, monkeypatch):
    hp = RomeHparams(layer=1, context_templates=((3, 2),))
    editors.context_templates(tmp_path, tiny_model("tiny-gpt2"), hp)
    calls = []
    real = editors.templates_for
    monkeypatch.setattr(editors, "templates_for", lambda *a, **k: calls.append(1) or real(*a, **k))
    editors.context_templates(tmp_path, tiny_model("tiny-gpt2", seed=1), hp)
    assert calls == [1]  # not the seed-0 model's text


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
