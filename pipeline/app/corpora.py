"""The texts `cfg.corpus` names: the key statistics' corpus and the held-out perplexity text.

The key statistics C = E[k kᵀ] (ROME, MEMIT, EMMET; AlphaEdit's null space) read one corpus;
the damage an edit does is measured as perplexity on a text they never read, or the editors
that use C would be judged on their own data. `statistics_corpus` and `held_out_text` resolve
the two from the same config, so they cannot overlap:

  - local files (`local_dir`, e.g. ../shared/data/wikipedia: a Wikipedia dump and WikiText-2):
    the statistics read every file but `held_out.file` (WikiText-2's test split), which is the
    perplexity text;
  - `datasets` WikiText-103: the statistics read `split` (train), perplexity reads
    `held_out.split` (test; WikiText-2 and -103 share it);
  - the bundled sample (`data/samples/`, itself the start of WikiText-2's test split): its last
    articles (`held_out.sample_fraction` of its characters, whole articles) are held out.
A local directory without the held-out file takes the sample's held-out part, with a warning.

Each is a `CorpusText`: what was read (files and their sha256, or the dataset and split) and a
content digest, which keys the statistics cache: two directories with other text never share
a cached C, and the same text under another path does.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from pipeline.core import files
from pipeline.data import corpus

log = logging.getLogger(__name__)

TextSource = Callable[[], Iterable[str]]
READER_VERSION = 1  # bump when the readers (markup stripping, detokenization) change the text


@dataclass(frozen=True)
class CorpusText:
    """A text the pipeline reads: its name, where it comes from, and a stream of passages."""

    name: str  # wikipedia-local | wikitext-103-raw-v1 | wikitext-sample (the cache's folder)
    origin: str  # local files | datasets | bundled sample
    files: tuple[tuple[str, str], ...] = ()  # (path, sha256) read, in order
    part: str = "all"  # which part of them (the sample: statistics | held_out)
    dataset: tuple[str, str] | None = None  # (name, split) read through `datasets`
    texts: TextSource = field(default=lambda: iter(()), compare=False, repr=False)

    @property
    def digest(self) -> str:
        """sha256 of the content: the files' digests in order (not their paths), the part, and
        for `datasets` its name and split (the hub pins a dataset's content by them)."""
        description = {
            "files": [sha for _, sha in self.files],
            "part": self.part,
            "dataset": self.dataset,
            "reader": READER_VERSION,
        }
        return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()

    def describe(self) -> dict[str, Any]:
        """What run.json and summaries record."""
        out: dict[str, Any] = {"name": self.name, "origin": self.origin, "sha256": self.digest}
        if self.files:
            out["files"] = [{"path": path, "sha256": sha} for path, sha in self.files]
        if self.part != "all":
            out["part"] = self.part
        if self.dataset:
            out["dataset"], out["split"] = self.dataset
        return out


_DIGESTS: dict[tuple[str, int, int], str] = {}


def file_digest(path: Path) -> str:
    """A file's sha256, computed once per process for an unchanged file (path, size, mtime)."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _DIGESTS:
        _DIGESTS[key] = files.sha256_file(path)
    return _DIGESTS[key]


def _digested(paths: Iterable[Path]) -> tuple[tuple[str, str], ...]:
    return tuple((str(path), file_digest(path)) for path in paths)


_WARNED: set[str] = set()


def _warn_once(key: str, message: str, *args: Any) -> None:
    if key not in _WARNED:  # once per process, not at every look-up
        _WARNED.add(key)
        log.warning(message, *args)


def source_kind(corpus_cfg: DictConfig) -> str:
    """Which source `corpus.source` means here: local, datasets or sample.

    `auto` takes the text in the data root: the local files under `local_dir` (besides the
    held-out file), else WikiText cached by `datasets` under `cache_dir` (`make data`), else
    the small sample bundled in `data/samples/` (with a warning)."""
    source = corpus_cfg.source
    local_dir = Path(corpus_cfg.local_dir)
    has_local = local_dir.is_dir() and bool(corpus.local_files(local_dir, _held_out(corpus_cfg)))
    if source == "local" or (source == "auto" and has_local):
        if not has_local:
            raise FileNotFoundError(
                f"no corpus files in {local_dir} besides the held-out {_held_out(corpus_cfg)}; "
                "set corpus.local_dir, or corpus.source=datasets"
            )
        return "local"
    if source == "datasets" or (source == "auto" and corpus.has_hf_cache(corpus_cfg.cache_dir)):
        return "datasets"
    if source in ("auto", "sample"):
        if source == "auto":
            _warn_once(
                str(local_dir),
                "no corpus text in the data root (%s, nor WikiText cached in %s): the key "
                "statistics use the small sample bundled in data/samples/%s (run `make data` "
                "with network or set ROME_DATA=... for the full corpus)",
                local_dir,
                corpus_cfg.cache_dir,
                corpus_cfg.sample,
            )
        return "sample"
    raise ValueError(f"corpus.source must be auto, local, datasets or sample, got {source!r}")


def _held_out(corpus_cfg: DictConfig) -> list[str]:
    name = corpus_cfg.held_out.get("file")
    return [str(name)] if name else []


def _sample(corpus_cfg: DictConfig, part: str) -> CorpusText:
    fraction = float(corpus_cfg.held_out.sample_fraction)
    path = corpus.sample_path(corpus_cfg.sample)
    return CorpusText(
        corpus_cfg.sample_name,
        "bundled sample",
        _digested([path]),
        f"{part} (the held-out part: the whole articles in its last {fraction:g} of characters)",
        texts=lambda: corpus.read_sample(corpus_cfg.sample, part, fraction),
    )


def statistics_corpus(corpus_cfg: DictConfig) -> CorpusText:
    """The text the key statistics read: never the held-out text."""
    kind = source_kind(corpus_cfg)
    if kind == "local":
        local_dir, exclude = Path(corpus_cfg.local_dir), _held_out(corpus_cfg)
        return CorpusText(
            f"{corpus_cfg.name}-local",
            "local files",
            _digested(corpus.local_files(local_dir, exclude)),
            texts=lambda: corpus.read_local(local_dir, exclude),
        )
    if kind == "datasets":
        return CorpusText(
            corpus_cfg.dataset,
            "datasets",
            dataset=(corpus_cfg.dataset, corpus_cfg.split),
            texts=lambda: corpus.read_hf_wikitext(
                corpus_cfg.dataset, corpus_cfg.split, cache_dir=corpus_cfg.cache_dir
            ),
        )
    return _sample(corpus_cfg, "statistics")


def held_out_text(corpus_cfg: DictConfig) -> CorpusText:
    """The perplexity text: the part of the same source the statistics never read."""
    kind = source_kind(corpus_cfg)
    if kind == "local":
        local_dir, names = Path(corpus_cfg.local_dir), _held_out(corpus_cfg)
        path = local_dir / names[0] if names else None
        if path is not None and path.is_file():
            return CorpusText(
                f"{corpus_cfg.name}-held-out",
                "local files",
                _digested([path]),
                texts=lambda: corpus.read_file(path),
            )
        _warn_once(
            f"held-out {local_dir}",
            "no held-out text %s in %s: perplexity is measured on the held-out part of the "
            "bundled sample instead",
            names,
            local_dir,
        )
    if kind == "datasets":
        split = str(corpus_cfg.held_out.split)
        if split == corpus_cfg.split:
            raise ValueError(
                f"corpus.held_out.split={split} is the split the statistics read (corpus.split)"
            )
        return CorpusText(
            f"{corpus_cfg.dataset}-{split}",
            "datasets",
            dataset=(corpus_cfg.dataset, split),
            texts=lambda: corpus.read_hf_wikitext(
                corpus_cfg.dataset, split, cache_dir=corpus_cfg.cache_dir
            ),
        )
    return _sample(corpus_cfg, "held_out")
