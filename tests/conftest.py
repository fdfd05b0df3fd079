"""Shared fixtures: model specs from conf/model, the real SmolLM2 once per session, data roots."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import yaml

from pipeline.core.models import LoadedModel, load_model

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("ROME_CACHE", ROOT / ".cache"))
TINY = ["tiny-gpt2", "tiny-gptj", "tiny-neox", "tiny-llama"]


def model_spec(name: str) -> dict:
    return yaml.safe_load((ROOT / "conf" / "model" / f"{name}.yaml").read_text())


def tiny_model(name: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> LoadedModel:
    return load_model(model_spec(name), cache_dir=CACHE, seed=seed, dtype=dtype)


@pytest.fixture(scope="session")
def smollm2() -> LoadedModel:
    """The embedded default model, converted to the cache on first use."""
    return load_model(model_spec("smollm2-135m"), cache_dir=CACHE)


@pytest.fixture(scope="session")
def data_root() -> Path:
    """The data root CI points at (../shared/data), or skip where there is none."""
    root = Path(os.environ.get("ROME_DATA", ROOT.parent / "shared" / "data"))
    if not (root / "known_1000.json").exists():
        pytest.skip(f"no data root with known_1000.json at {root}")
    return root
