"""Second-moment statistics C = E[k kᵀ] of the keys that ROME rewrites.

The keys are the inputs of the MLP output projection (`mlp_out`) at one layer, over every real
token of a text corpus. ROME uses C to spread an edit in the directions where keys rarely vary,
so the statistic only needs to be computed once per (model, layer, corpus, budget) and cached.
The cache key is what determines the numbers: the model's weights and dtype, the tokenizer, the
corpus' content (its digest, not its name), the budgets, the chunk length and the accumulation
dtype (`StatsKey`).

How a corpus becomes batches, deterministically (so shards and the single job agree):
  1. texts are taken in order; blank texts are skipped; each remaining text is one *sample*;
  2. a sample is tokenized as the model sees a prompt and cut into chunks of `max_length` tokens;
  3. the budgets stop the stream: at most `max_samples` samples, at most `max_tokens` tokens
     (the chunk that crosses the token budget is cut so the total is exactly `max_tokens`);
  4. chunks are grouped in order into batches of `batch_size`;
  5. shard `i` of `n` processes the batches whose index is `i` modulo `n`.
Every shard tokenizes the whole (budgeted) stream, which is cheap, but runs the model only on its
own batches. Because a batch holds the same chunks in every layout, its partial sum is bitwise the
same; merging the shards' sums reproduces the single job up to the order of float64 additions
(relative differences around 1e-16).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from pipeline.core.files import file_lock, follow_umask
from pipeline.core.hooks import StopForward, run_until_stopped
from pipeline.core.models import LoadedModel, identity_of
from pipeline.core.tokens import right_pad, tokenizer_identity

log = logging.getLogger(__name__)

CACHE_FORMAT = 2  # 2: the checksum covers the header (count, key) too; 1's files are recomputed


@dataclass
class SecondMoment:
    """Running Σ k kᵀ and the number of keys, so partial results add up exactly."""

    sum: torch.Tensor
    count: int
    # Loaded from a cache file that passed its checksum and key check (not computed here).
    from_cache: bool = field(default=False, compare=False)

    @classmethod
    def zeros(cls, dim: int, dtype: torch.dtype = torch.float64) -> SecondMoment:
        return cls(torch.zeros(dim, dim, dtype=dtype), 0)

    def moment(self) -> torch.Tensor:
        """E[k kᵀ] (uncentred, as ROME uses it)."""
        if self.count == 0:
            raise ValueError("no keys were accumulated: the corpus (or this shard) was empty")
        return self.sum / self.count

    def merge(self, other: SecondMoment) -> SecondMoment:
        if self.sum.shape != other.sum.shape:
            raise ValueError(f"cannot merge shapes {self.sum.shape} and {other.sum.shape}")
        return SecondMoment(self.sum + other.sum.to(self.sum.dtype), self.count + other.count)


def merge(parts: Iterable[SecondMoment]) -> SecondMoment:
    """Merge shard results (in shard order, for reproducibility)."""
    parts = list(parts)
    if not parts:
        raise ValueError("nothing to merge")
    total = SecondMoment(parts[0].sum.clone(), parts[0].count)
    for part in parts[1:]:
        total = total.merge(part)
    return total


# --------------------------------------------------------------------------------------------
# Corpus -> chunks -> batches


def token_chunks(
    tokenizer,
    texts: Iterable[str],
    *,
    max_length: int = 256,
    max_samples: int | None = None,
    max_tokens: int | None = None,
) -> Iterator[list[int]]:
    """Token chunks of the corpus under the sample and token budgets (steps 1-3 above)."""
    if max_length < 1:
        raise ValueError("max_length must be positive")
    samples = tokens = 0
    for text in texts:
        if max_samples is not None and samples >= max_samples:
            return
        if not text.strip():
            continue
        ids = tokenizer(text)["input_ids"]
        if not ids:
            continue
        samples += 1
        for start in range(0, len(ids), max_length):
            chunk = ids[start : start + max_length]
            if max_tokens is not None:
                chunk = chunk[: max_tokens - tokens]
                if not chunk:
                    return
            tokens += len(chunk)
            yield chunk


def batched(items: Iterable, size: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


# --------------------------------------------------------------------------------------------
# Streaming accumulation


@torch.no_grad()
def second_moment(lm: LoadedModel, layer: int, texts: Iterable[str], **budget) -> SecondMoment:
    """Σ k kᵀ of the inputs of `mlp_out` at `layer` over the corpus (`second_moments`' options)."""
    return second_moments(lm, [layer], texts, **budget)[layer % lm.n_layers]


@torch.no_grad()
def second_moments(
    lm: LoadedModel,
    layers: Sequence[int],
    texts: Iterable[str],
    *,
    max_length: int = 256,
    batch_size: int = 16,
    max_samples: int | None = None,
    max_tokens: int | None = None,
    accumulate_dtype: torch.dtype = torch.float64,
    shard: int = 0,
    num_shards: int = 1,
    progress: bool = True,
) -> dict[int, SecondMoment]:
    """Stream Σ k kᵀ of the inputs of `mlp_out` at each of `layers` over the corpus (one shard
    of it), all in one forward pass per batch.

    Memory is bounded by one batch of activations plus the (d, d) sums. The forward pass stops
    at the highest layer's projection: layers above it are never run. A layer's sum is bitwise
    the same as when it is computed alone (the same batches reach it the same way).
    """
    if not 0 <= shard < num_shards:
        raise ValueError(f"shard {shard} is not in [0, {num_shards})")
    layers = sorted({layer % lm.n_layers for layer in layers})
    if not layers:
        raise ValueError("no layers to compute statistics for")
    totals: dict[int, SecondMoment] = {}
    mask_box: list[torch.Tensor] = []

    def accumulate(total: SecondMoment, last: bool):
        def hook(module, args):
            keys = args[0][mask_box[0]].to(accumulate_dtype)  # (real tokens, d), no padding
            total.sum.addmm_(keys.T, keys)
            total.count += keys.shape[0]
            if last:
                raise StopForward

        return hook

    handles = []
    for layer in layers:
        total = SecondMoment.zeros(lm.mlp_out_weight(layer).shape[1], accumulate_dtype)
        total.sum = total.sum.to(lm.device)
        totals[layer] = total
        handles.append(
            lm.module("mlp_out", layer).register_forward_pre_hook(
                accumulate(total, layer == layers[-1])
            )
        )
    chunks = token_chunks(
        lm.tokenizer, texts, max_length=max_length, max_samples=max_samples, max_tokens=max_tokens
    )
    pad_id = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    expected = max_tokens if num_shards == 1 else None
    bar = tqdm(total=expected, unit="tok", unit_scale=True, disable=not progress)
    named = f"layer {layers[0]}" if len(layers) == 1 else f"layers {', '.join(map(str, layers))}"
    bar.set_description(f"keys of {lm.name} {named}")
    try:
        for index, batch in enumerate(batched(chunks, batch_size)):
            if index % num_shards != shard:
                continue
            ids, mask = right_pad(batch, pad_id, lm.device)
            mask_box[:] = [mask.bool()]
            run_until_stopped(lm, ids, mask)
            bar.update(int(mask.sum()))
    finally:
        for handle in handles:
            handle.remove()
        bar.close()
    for total in totals.values():
        total.sum = total.sum.cpu()
    return totals


# --------------------------------------------------------------------------------------------
# Disk cache


def _slug(value: object) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(value))


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _checksum(tensor: torch.Tensor, header: dict[str, str]) -> str:
    """sha256 of the sum's bytes and of every header entry (the count divides the sum, so a
    changed count would rescale C as surely as a changed byte)."""
    raw = tensor.detach().cpu().contiguous().view(torch.uint8).numpy()
    fields = json.dumps({k: v for k, v in header.items() if k != "sha256"}, sort_keys=True)
    return hashlib.sha256(raw.tobytes() + fields.encode()).hexdigest()


@dataclass(frozen=True)
class StatsKey:
    """Everything the statistic depends on; it names the cache file and is checked on load."""

    model: str
    layer: int
    corpus: str
    max_samples: int | None = None
    max_tokens: int | None = None
    max_length: int = 256
    accumulate_dtype: torch.dtype = torch.float64
    model_dtype: torch.dtype = torch.float32
    model_identity: str = ""  # LoadedModel.identity: which weights, not just which name
    corpus_digest: str = ""  # the text's content (`CorpusText.digest`): the name is a label
    tokenizer: str = ""  # `tokenizer_identity`: how the text becomes keys

    def path(self, cache_dir: str | Path, part: tuple[int, int] | None = None) -> Path:
        """The cache file; `part=(i, n)` names shard i of n's partial sum beside it."""
        name = (
            f"mom2-layer{self.layer}-samples{self.max_samples or 'all'}"
            f"-tokens{self.max_tokens or 'all'}-len{self.max_length}"
            f"-{_dtype_name(self.accumulate_dtype)}-model{_dtype_name(self.model_dtype)}"
            f"-id{self.model_identity or 'none'}-text{self.corpus_digest[:16] or 'none'}"
            f"-tok{self.tokenizer[:12] or 'none'}"
        )
        if part is not None:
            name += f"-part{part[0]}of{part[1]}"
        return (
            Path(cache_dir)
            / "stats"
            / _slug(self.model)
            / _slug(self.corpus)
            / f"{name}.safetensors"
        )

    def metadata(self) -> dict[str, str]:
        return {
            "format": str(CACHE_FORMAT),
            "model": self.model,
            "layer": str(self.layer),
            "corpus": self.corpus,
            "max_samples": json.dumps(self.max_samples),
            "max_tokens": json.dumps(self.max_tokens),
            "max_length": str(self.max_length),
            "dtype": _dtype_name(self.accumulate_dtype),
            "model_dtype": _dtype_name(self.model_dtype),
            "model_identity": self.model_identity,
            "corpus_sha256": self.corpus_digest,
            "tokenizer": self.tokenizer,
        }

    @classmethod
    def of(
        cls, lm: LoadedModel, layer: int, corpus: str, corpus_digest: str = "", **budget
    ) -> StatsKey:
        return cls(
            lm.name,
            layer % lm.n_layers,
            corpus,
            model_dtype=lm.dtype,
            model_identity=identity_of(lm),
            corpus_digest=corpus_digest,
            tokenizer=tokenizer_identity(lm.tokenizer),
            **budget,
        )


def save_second_moment(path: Path, stat: SecondMoment, metadata: dict[str, str]) -> None:
    """Write atomically (temporary file, then rename) with a sha256 of the sum in the header."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tensor = stat.sum.detach().cpu().contiguous()
    header = dict(metadata, count=str(stat.count))
    header["sha256"] = _checksum(tensor, header)
    staging = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        save_file({"sum": tensor}, str(staging), metadata=header)
        follow_umask(staging)  # save_file creates 0600
        with open(staging, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)


def load_second_moment(path: Path, expected: dict[str, str] | None = None) -> SecondMoment:
    """Read a cached statistic; raise ValueError if it is partial, corrupted or for another key."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
            tensor = handle.get_tensor("sum")
    except Exception as error:  # safetensors raises its own error types for damaged files
        raise ValueError(f"unreadable statistics file {path}: {error}") from error
    if header.get("sha256") != _checksum(tensor, header):
        raise ValueError(f"checksum mismatch in {path}")
    for key, value in (expected or {}).items():
        if header.get(key) != value:
            raise ValueError(f"{path} holds {key}={header.get(key)!r}, expected {value!r}")
    return SecondMoment(tensor, int(header["count"]), from_cache=True)


def _load_or_none(path: Path, key: StatsKey) -> SecondMoment | None:
    if not path.exists():
        return None
    try:
        return load_second_moment(path, key.metadata())
    except ValueError as error:
        log.warning("discarding cached statistics (%s); recomputing", error)
        return None


def cached_second_moment(
    lm: LoadedModel,
    key: StatsKey,
    texts: Iterable[str] | Callable[[], Iterable[str]],
    **options,
) -> SecondMoment:
    """`cached_second_moments` of one key."""
    return cached_second_moments(lm, [key], texts, **options)[key.layer]


def cached_second_moments(
    lm: LoadedModel,
    keys: Sequence[StatsKey],
    texts: Iterable[str] | Callable[[], Iterable[str]],
    *,
    cache_dir: str | Path,
    batch_size: int = 16,
    shard: tuple[int, int] | None = None,
    progress: bool = True,
) -> dict[int, SecondMoment]:
    """Load each statistic in `keys` (one per layer, the same corpus and budget) from the cache,
    or compute the missing ones together, in one pass over the corpus, and store each once.

    `texts` may be a zero-argument callable so a cache hit never opens the corpus. A file that
    fails its checksum or key check is logged and recomputed, never used; each result's
    `from_cache` says which of the two it is. Concurrent jobs
    serialise on lock files (taken in path order), so the first computes and the others load
    its results. With `shard=(i, n)`, only shard i's partial sums are computed and cached
    (`merge_shards` combines the n parts into the full statistic).
    """
    budgets = {
        (k.corpus, k.corpus_digest, k.max_samples, k.max_tokens, k.max_length, k.accumulate_dtype)
        for k in keys
    }
    if len(budgets) > 1:
        raise ValueError(f"statistics keys {list(keys)} differ in corpus or budget")
    for key in keys:
        if (key.model, key.model_dtype, key.model_identity, key.tokenizer) != (
            lm.name,
            lm.dtype,
            identity_of(lm),
            tokenizer_identity(lm.tokenizer),
        ):
            raise ValueError(f"statistics key {key} does not describe model {lm.name} ({lm.dtype})")
    index, count = shard or (0, 1)
    paths = {key.layer: key.path(cache_dir, shard if count > 1 else None) for key in keys}
    by_layer = {key.layer: key for key in keys}
    found = {layer: _load_or_none(paths[layer], by_layer[layer]) for layer in paths}
    missing = sorted(layer for layer, stat in found.items() if stat is None)
    if missing:
        with contextlib.ExitStack() as locks:
            for layer in sorted(missing, key=lambda layer: str(paths[layer])):
                locks.enter_context(file_lock(paths[layer].with_suffix(".lock")))
            for layer in missing:  # another job may have finished some while we waited
                found[layer] = _load_or_none(paths[layer], by_layer[layer])
            missing = [layer for layer in missing if found[layer] is None]
            if missing:
                key = by_layer[missing[0]]
                computed = second_moments(
                    lm,
                    missing,
                    texts() if callable(texts) else texts,
                    max_length=key.max_length,
                    batch_size=batch_size,
                    max_samples=key.max_samples,
                    max_tokens=key.max_tokens,
                    accumulate_dtype=key.accumulate_dtype,
                    shard=index,
                    num_shards=count,
                    progress=progress,
                )
                for layer, stat in computed.items():
                    save_second_moment(paths[layer], stat, by_layer[layer].metadata())
                    log.info("cached statistics of %d keys at %s", stat.count, paths[layer])
                    found[layer] = stat
    return found


def merge_shards(key: StatsKey, cache_dir: str | Path, count: int) -> SecondMoment:
    """Merge the n cached shard parts into the full statistic and cache it.

    Raises FileNotFoundError naming the parts that are missing or damaged.
    """
    parts = [_load_or_none(key.path(cache_dir, (i, count)), key) for i in range(count)]
    missing = [i for i, part in enumerate(parts) if part is None]
    if missing:
        raise FileNotFoundError(
            f"shard parts {missing} of {count} are missing or damaged under "
            f"{key.path(cache_dir).parent}; run those shards first"
        )
    total = merge(parts)
    save_second_moment(key.path(cache_dir), total, key.metadata())
    return total
