"""Model families and loading (the embedded default's conversion is in `gguf`, random and tiny
test models in `random_models`).

Every architecture difference the pipeline cares about lives in `FAMILIES`: where the token
embeddings, the blocks, the MLPs, the MLP output projection that ROME rewrites, the attention,
the final norm and the unembedding sit. Algorithms ask a `LoadedModel` for module paths and
never test model names.
"""

from __future__ import annotations

import hashlib
import json
import logging
import resource
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.core.files import ModelNotAvailableError, files_identity  # shared with gguf

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Family:
    """Module paths of one architecture family; "{}" stands for the layer index."""

    name: str
    embed: str
    block: str
    mlp: str
    mlp_out: str
    attn: str
    final_norm: str
    unembed: str
    # GPT-2's Conv1D stores its weight as (in, out); nn.Linear stores (out, in).
    mlp_out_transposed: bool = False
    layers_attr: str = "num_hidden_layers"
    # The longest input, in tokens: learned position tables (GPT-2) fail beyond it, rotary
    # models (the others) leave what they were trained on.
    context_attr: str = "max_position_embeddings"


FAMILIES: dict[str, Family] = {
    "gpt2": Family(
        name="gpt2",
        embed="transformer.wte",
        block="transformer.h.{}",
        mlp="transformer.h.{}.mlp",
        mlp_out="transformer.h.{}.mlp.c_proj",
        attn="transformer.h.{}.attn",
        final_norm="transformer.ln_f",
        unembed="lm_head",
        mlp_out_transposed=True,
        layers_attr="n_layer",
        context_attr="n_positions",
    ),
    "gptj": Family(
        name="gptj",
        embed="transformer.wte",
        block="transformer.h.{}",
        mlp="transformer.h.{}.mlp",
        mlp_out="transformer.h.{}.mlp.fc_out",
        attn="transformer.h.{}.attn",
        final_norm="transformer.ln_f",
        unembed="lm_head",
        layers_attr="n_layer",
        context_attr="n_positions",
    ),
    "gpt_neox": Family(
        name="gpt_neox",
        embed="gpt_neox.embed_in",
        block="gpt_neox.layers.{}",
        mlp="gpt_neox.layers.{}.mlp",
        mlp_out="gpt_neox.layers.{}.mlp.dense_4h_to_h",
        attn="gpt_neox.layers.{}.attention",
        final_norm="gpt_neox.final_layer_norm",
        unembed="lm_head",
    ),
    "llama": Family(
        name="llama",
        embed="model.embed_tokens",
        block="model.layers.{}",
        mlp="model.layers.{}.mlp",
        mlp_out="model.layers.{}.mlp.down_proj",
        attn="model.layers.{}.self_attn",
        final_norm="model.norm",
        unembed="lm_head",
    ),
}

# transformers' `model_type` -> family. Llama, Mistral and Qwen2 share module names.
MODEL_TYPES: dict[str, str] = {
    "gpt2": "gpt2",
    "gptj": "gptj",
    "gpt_neox": "gpt_neox",
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "llama",
}


class UnsupportedModelError(ValueError):
    pass


def family_for(model_type: str) -> Family:
    try:
        return FAMILIES[MODEL_TYPES[model_type]]
    except KeyError:
        supported = ", ".join(sorted(MODEL_TYPES))
        raise UnsupportedModelError(
            f"model_type '{model_type}' is not supported; supported model types: {supported}. "
            "Add its module paths to pipeline.core.models.FAMILIES to support it."
        ) from None


def layer_problems(n_layers: int, settings: Mapping[str, int | Sequence[int]]) -> list[str]:
    """What is wrong with the layers each setting names, for a model of `n_layers` blocks.

    A layer is 0 to n-1, or -n to -1 counted from the end (as `LoadedModel.path` reads it);
    anything else used to wrap round silently (layer 4 of 4 edited layer 0, while the config
    and the results directory said 4). A list may not name one block twice (3 and -1 of 4).
    """
    problems = []
    for name, value in settings.items():
        layers = [value] if isinstance(value, int) else [int(x) for x in value]
        outside = [x for x in layers if not -n_layers <= x < n_layers]
        if outside:
            problems.append(
                f"{name}={value!r}: layer {', '.join(map(str, outside))} is outside the model's "
                f"{n_layers} layers (0 to {n_layers - 1}, or -{n_layers} to -1 from the end)"
            )
        elif len({x % n_layers for x in layers}) < len(layers):
            problems.append(f"{name}={value!r} names one of the model's {n_layers} layers twice")
    return problems


def check_layers(n_layers: int, **settings: int | Sequence[int]) -> None:
    """Raise ValueError naming every setting whose layers are not in the model (see above)."""
    problems = layer_problems(n_layers, settings)
    if problems:
        raise ValueError("; ".join(problems))


def declared_layers(spec: Mapping[str, Any], cache_dir: str | Path = ".cache") -> int | None:
    """How many blocks the model of a `conf/model/*.yaml` entry has, told without loading its
    weights: a local directory's config.json, a random model's `arch`, the embedded GGUF's
    header (or its conversion's config.json), a hub model's config (cached, else fetched
    alone). None where none of these can be read; the loaded model is checked then."""
    from transformers import AutoConfig

    try:
        if spec.get("path"):
            config = AutoConfig.from_pretrained(str(spec["path"]), local_files_only=True)
        elif spec.get("source", "hub") == "random":
            arch = dict(spec["arch"])
            config = AutoConfig.for_model(arch.pop("model_type"), **arch)
        elif spec.get("source") == "gguf":
            from pipeline.core.gguf import gguf_layers

            return gguf_layers(spec, Path(cache_dir))
        else:
            config = _hub_config(spec["hf_id"], spec.get("revision"))
        return int(getattr(config, family_for(config.model_type).layers_attr))
    except Exception as error:  # noqa: BLE001 - unknown here; checked once the model is loaded
        log.info("the model's layer count is not known before loading it (%s)", error)
        return None


def _hub_config(hf_id: str, revision: str | None):
    """A hub model's config from the local cache, else from the hub (the config file alone)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(hf_id, revision=revision, local_files_only=True)
    except OSError:
        return AutoConfig.from_pretrained(hf_id, revision=revision)


@dataclass
class LoadedModel:
    """A causal LM with its tokenizer and the module paths of its family."""

    model: nn.Module
    tokenizer: Any
    family: Family
    name: str = "model"
    source: str = ""
    # What the weights are, as a short digest (see `load_model`): caches of results computed
    # from the model are keyed by it, so another model under the same name never hits them.
    identity: str = ""

    @property
    def n_layers(self) -> int:
        return int(getattr(self.model.config, self.family.layers_attr))

    @property
    def context_length(self) -> int:
        """The most tokens one input may have."""
        return int(getattr(self.model.config, self.family.context_attr))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def path(self, kind: str, layer: int | None = None) -> str:
        """Module path of `kind` (embed, block, mlp, mlp_out, attn, final_norm, unembed)."""
        template = getattr(self.family, kind)
        if "{}" in template:
            if layer is None:
                raise ValueError(f"'{kind}' needs a layer index")
            if not -self.n_layers <= layer < self.n_layers:
                raise IndexError(f"layer {layer} out of range for {self.n_layers} layers")
            return template.format(layer % self.n_layers)
        return template

    def module(self, kind: str, layer: int | None = None) -> nn.Module:
        return self.model.get_submodule(self.path(kind, layer))

    def mlp_out_weight(self, layer: int) -> torch.Tensor:
        """The rewritten projection's weight as (out, in), a view whatever its storage."""
        weight = self.module("mlp_out", layer).weight
        return weight.T if self.family.mlp_out_transposed else weight

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits from the last block's outputs: the final norm, then the unembedding."""
        return self.module("unembed")(self.module("final_norm")(hidden))


def wrap(
    model: nn.Module, tokenizer: Any, name: str = "model", source: str = "", identity: str = ""
) -> LoadedModel:
    """Attach the family registry entry to an already-loaded transformers model (without an
    `identity`, `identity_of` digests its parameters when a cache first needs one)."""
    return LoadedModel(
        model, tokenizer, family_for(model.config.model_type), name, source, identity
    )


def identity_of(lm: LoadedModel) -> str:
    """`lm.identity`, or, for a model handed in without one, a digest of its parameters."""
    if not lm.identity:
        lm.identity = parameters_identity(lm.model)
    return lm.identity


def digest(description: Any) -> str:
    """A short stable digest of a JSON-able description."""
    text = json.dumps(description, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def parameters_identity(model: nn.Module) -> str:
    """A digest of every parameter's bytes (for models handed in without a source)."""
    hasher = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        hasher.update(name.encode())
        hasher.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return hasher.hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# Loading


DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,  # for exact checks: a batch's shape no longer moves the last bits
}


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def peak_memory_gib(device: str | torch.device) -> float:
    """Peak GPU memory allocated on a CUDA device, else the process's peak resident memory."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[dtype]
    except KeyError:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got '{dtype}'") from None


def load_model(
    spec: Mapping[str, Any],
    *,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "float32",
    cache_dir: str | Path = ".cache",
    seed: int = 0,
) -> LoadedModel:
    """Load the model a `conf/model/*.yaml` entry describes, in eval mode, gradients off.

    `spec.source` is one of:
      - `gguf`: a GGUF file shipped by a Python package (the embedded default), converted once
        to safetensors under `cache_dir` so later loads take seconds;
      - `hub`: a Hugging Face hub id (or `spec.path`, a local directory);
      - `random`: a randomly initialised model from `spec.arch` (transformers config fields),
        seeded, with a tokenizer trained on the bundled text (no download).
    """
    device = resolve_device(str(device)) if not isinstance(device, torch.device) else device
    torch_dtype = resolve_dtype(dtype)
    cache_dir = Path(cache_dir)
    source = spec.get("source", "hub")
    name = spec.get("name", "model")
    if spec.get("path"):
        model, tokenizer = _load_pretrained(str(spec["path"]), torch_dtype, local_only=True)
        origin = str(spec["path"])
        identity = digest({"path": files_identity(spec["path"])})
    elif source == "gguf":
        from pipeline.core.gguf import convert_gguf, gguf_identity  # only for gguf models

        directory = convert_gguf(spec, cache_dir)
        model, tokenizer = _load_pretrained(str(directory), torch_dtype, local_only=True)
        origin = f"gguf:{spec['gguf']['package']}/{spec['gguf']['file']} (cached at {directory})"
        identity = digest({"gguf": gguf_identity(spec)})
    elif source == "hub":
        model, tokenizer = _load_pretrained(spec["hf_id"], torch_dtype, local_only=False, spec=spec)
        origin = f"hub:{spec['hf_id']}"
        # The snapshot's commit pins the weights; without one (a local copy), the files do.
        commit = getattr(model.config, "_commit_hash", None)
        pinned = commit or files_identity(model.config._name_or_path)
        identity = digest({"hub": spec["hf_id"], "revision": pinned})
    elif source == "random":
        from pipeline.core.random_models import build_random

        model, tokenizer = build_random(spec, cache_dir, seed=seed, dtype=torch_dtype)
        origin = f"random(seed={seed})"
        # Deterministic from the spec and the seed (and the tokenizer trained on bundled text).
        identity = digest(
            {
                "random": dict(spec.get("arch", {})),
                "seed": seed,
                "tokenizer": tokenizer.name_or_path,
            }
        )
    else:
        raise ValueError(f"model.source must be gguf, hub or random, got '{source}'")
    model.to(device).eval().requires_grad_(False)
    _ensure_pad_token(tokenizer)
    family = family_for(model.config.model_type)
    return LoadedModel(model, tokenizer, family, name, origin, identity)


def _ensure_pad_token(tokenizer: Any) -> None:
    # Batches are right-padded: causal models never attend to the padding after real tokens.
    tokenizer.padding_side = "right"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


def _load_pretrained(
    name_or_path: str, dtype: torch.dtype, *, local_only: bool, spec: Mapping | None = None
):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if local_only and not Path(name_or_path).exists():
        raise ModelNotAvailableError(
            f"model.path={name_or_path} does not exist; point model.path at a local directory "
            "with the model's config, weights and tokenizer (save_pretrained's layout)"
        )
    revision = (spec or {}).get("revision")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, revision=revision)
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype, revision=revision)
    except (OSError, ValueError) as error:
        if local_only or not _looks_like_missing(error):
            raise
        raise ModelNotAvailableError(
            f"Model '{name_or_path}' needs the Hugging Face hub: it is not in the local cache "
            f"({_hub_cache()}) and the hub could not be reached. Run once with network access "
            "(it is then cached there), or download it elsewhere and pass its directory with "
            "`model.path=/path/to/model`. Offline, `model=smollm2-135m` (embedded) and the "
            f"`tiny-*` models always work. (Cause: {type(error).__name__}: "
            f"{str(error).strip().splitlines()[0] if str(error).strip() else ''})"
        ) from None
    return model, tokenizer


def _hub_cache() -> str:
    try:
        from huggingface_hub import constants

        return str(constants.HF_HUB_CACHE)
    except (ImportError, AttributeError):  # pragma: no cover - an old huggingface_hub
        return "$HF_HOME/hub"


def _looks_like_missing(error: Exception) -> bool:
    text = str(error).lower()
    return any(
        needle in text
        for needle in ("offline", "connect", "couldn't", "could not", "not found", "resolve")
    ) or isinstance(error, OSError)
