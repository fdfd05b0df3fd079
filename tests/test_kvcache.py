"""The transformers cache API the fast paths rely on; a failure names the installed version."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
import transformers
from transformers.utils import generic

from pipeline.core import kvcache
from pipeline.core.editing.prefixes import Prefixes
from pipeline.core.patching import TraceOptions, trace
from pipeline.core.tokens import encode, subject_span
from tests.conftest import ROOT, TINY, tiny_model

VERSION = f"transformers {transformers.__version__} (fast paths tested on {kvcache.TESTED})"


def test_dynamic_cache_layout_is_what_the_fast_paths_read():
    pairs = [(torch.randn(2, 4, 3, 8), torch.randn(2, 4, 3, 8)) for _ in range(3)]
    cache = kvcache.from_pairs(pairs)
    assert hasattr(cache, "layers"), f"{VERSION}: DynamicCache has no .layers"
    assert len(cache.layers) == 3, f"{VERSION}: DynamicCache(pairs) does not hold one per layer"
    for (keys, values), (read_keys, read_values) in zip(pairs, kvcache.pairs(cache), strict=True):
        assert torch.equal(keys, read_keys) and torch.equal(values, read_values), (
            f"{VERSION}: cache.layers[i].keys/.values no longer give back what was stored"
        )
    grown_keys, _ = cache.update(torch.ones(2, 4, 1, 8), torch.ones(2, 4, 1, 8), 0)
    assert grown_keys.shape == (2, 4, 4, 8), f"{VERSION}: update no longer appends positions"
    assert kvcache.pairs(cache)[0][0].shape[2] == 4, f"{VERSION}: update not kept in the layer"


@pytest.mark.parametrize("name", TINY)
def test_the_model_takes_the_cache_under_its_supported_name(name, monkeypatch):
    lm = tiny_model(name)
    argument = kvcache.cache_argument(lm.model)
    warned = []
    monkeypatch.setattr(generic.logger, "warning_once", lambda *a, **k: warned.append(a))
    prompt = "The mother tongue of Danielle Darrieux is"
    ids = encode(lm.tokenizer, prompt)
    span = subject_span(lm.tokenizer, prompt, "Danielle Darrieux")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trace(lm, ids, span, [5], TraceOptions(samples=2, window=2, seed=0, engine="fast"))
        first = Prefixes.run(lm, [[1, 2, 3], [4, 5]])  # v*'s prefix reuse: build, then extend
        both = Prefixes.run(lm, [[6], [7, 8]], first, [0, 1])
        assert both.key_values[0][0].shape[2] == 5
    warned += [str(w.message) for w in caught if "past_key_values" in str(w.message)]
    assert not warned, f"{VERSION}: a deprecated argument was passed ({warned[0]})"
    if tuple(int(x) for x in transformers.__version__.split(".")[:2]) >= (5, 24):
        assert argument == "cache", f"{VERSION}: the forward takes no `cache` argument"


def test_transformers_is_bounded_below_the_first_untested_minor_version():
    pyproject = (ROOT / "pyproject.toml").read_text()
    bound = re.search(r'"transformers>=[\d.]+,<([\d.]+)"', pyproject)
    assert bound, "pyproject.toml: transformers has no upper bound"
    major, minor = (int(x) for x in kvcache.TESTED.split("."))
    assert bound.group(1) == f"{major}.{minor + 1}", "bound and kvcache.TESTED disagree"
    installed = tuple(int(x) for x in transformers.__version__.split(".")[:2])
    assert installed <= (major, minor), f"{VERSION}: newer than tested; rerun the fast-path tests"
