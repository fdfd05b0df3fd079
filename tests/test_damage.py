"""Damage from configuration: the held-out text's windows and the unedited perplexity's cache."""

from __future__ import annotations

import json

import pytest
from hydra import compose, initialize_config_dir

from pipeline.app import damage as damage_module
from pipeline.app.damage import HeldOutPerplexity
from tests.conftest import ROOT, tiny_model


def config(tmp_path, *overrides):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(
            "evaluate",
            overrides=[
                "model=tiny-gpt2",
                f"paths.data={tmp_path / 'data'}",
                f"paths.cache={tmp_path / 'cache'}",
                "eval.perplexity_tokens=1000",
                *overrides,
            ],
        )


def test_the_unedited_perplexity_is_cached_checksummed_and_recomputed_when_damaged(
    tmp_path, monkeypatch
):
    lm = tiny_model("tiny-gpt2")
    measure = HeldOutPerplexity(config(tmp_path), lm)
    assert measure.window == lm.context_length == 256  # 512 asked, the context caps it
    assert measure.describe()["windows"] == 3 and measure.describe()["tokens"] == 768
    first = measure.unedited()
    (entry,) = (tmp_path / "cache/perplexity").rglob("*.json")

    calls = []
    real = damage_module.window_nlls
    monkeypatch.setattr(
        damage_module, "window_nlls", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    assert measure.unedited() == first and not calls  # from the cache
    saved = json.loads(entry.read_text())
    saved["nlls"][0] += 0.5  # a changed number: the checksum no longer holds
    entry.write_text(json.dumps(saved))
    assert measure.unedited() == first and calls == [1]  # recomputed, not used
    assert json.loads(entry.read_text())["nlls"][0] == pytest.approx(saved["nlls"][0] - 0.5)


def test_switched_off_there_is_no_measurer(tmp_path):
    assert HeldOutPerplexity.of(config(tmp_path, "eval.perplexity=false"), None) is None
