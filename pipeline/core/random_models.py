"""Random-weight models of a real architecture (benchmarks without weights) and the tiny seeded
test models, with a small byte-level BPE tokenizer trained on the bundled samples."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from pipeline.core.files import file_lock

log = logging.getLogger(__name__)


def build_random(
    spec: Mapping[str, Any], cache_dir: Path, *, seed: int = 0, dtype: torch.dtype = torch.float32
):
    """A randomly initialised model from config fields, identical for the same seed."""
    from transformers import AutoConfig, AutoModelForCausalLM

    tokenizer = local_bpe_tokenizer(cache_dir, vocab_size=int(spec.get("tokenizer_vocab", 2048)))
    arch = dict(spec["arch"])
    model_type = arch.pop("model_type")
    arch.setdefault("vocab_size", len(tokenizer))
    arch.setdefault("bos_token_id", tokenizer.bos_token_id)
    arch.setdefault("eos_token_id", tokenizer.eos_token_id)
    config = AutoConfig.for_model(model_type, **arch)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model, tokenizer


# --------------------------------------------------------------------------------------------
# A GPT-2-style byte-level BPE tokenizer trained on the bundled text, for the random models.

BUNDLED_TEXT = Path(__file__).resolve().parents[2] / "data" / "samples"
# The files the tokenizer learns from, named: a sample added for another purpose must not change
# every random model's tokens (and so every tiny-model test's numbers).
TOKENIZER_SAMPLES = (
    "counterfact-edit_sample.json",
    "counterfact-first1000_sample.json",
    "known_1000_sample.json",
    "zsre_eval_sample.json",
)
SPECIAL = "<|endoftext|>"


def _training_text() -> list[str]:
    lines: list[str] = []
    for path in (BUNDLED_TEXT / name for name in TOKENIZER_SAMPLES):
        for record in json.loads(path.read_text()):
            lines.extend(str(v) for v in record.values() if isinstance(v, str))
    if not lines:
        raise FileNotFoundError(f"no bundled samples under {BUNDLED_TEXT} to train a tokenizer on")
    return lines


def local_bpe_tokenizer(cache_dir: Path, vocab_size: int = 2048):
    """Byte-level BPE (GPT-2's scheme: 'Ġ' marks a leading space) trained deterministically."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    text = _training_text()
    digest = hashlib.sha256("\n".join(text).encode()).hexdigest()[:12]
    target = Path(cache_dir) / "tokenizers" / f"byte-bpe-{vocab_size}-{digest}"
    if not (target / "tokenizer.json").exists():
        with file_lock(target.with_suffix(".lock")):
            if not (target / "tokenizer.json").exists():
                core = Tokenizer(models.BPE())
                core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
                core.decoder = decoders.ByteLevel()
                trainer = trainers.BpeTrainer(
                    vocab_size=vocab_size,
                    special_tokens=[SPECIAL],
                    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                    show_progress=False,
                )
                core.train_from_iterator(text, trainer)
                staging = target.with_name(target.name + ".tmp")
                shutil.rmtree(staging, ignore_errors=True)
                fast = PreTrainedTokenizerFast(
                    tokenizer_object=core, bos_token=SPECIAL, eos_token=SPECIAL
                )
                fast.save_pretrained(staging)
                shutil.rmtree(target, ignore_errors=True)
                os.replace(staging, target)
    return PreTrainedTokenizerFast.from_pretrained(target)
