"""Damage to the model from configuration: perplexity on the held-out text, edited and not.

`HeldOutPerplexity.of(cfg, lm)` reads the held-out text `cfg.corpus` names (never read by the
key statistics: `corpora.held_out_text`), tokenizes its first `eval.perplexity_tokens` tokens
into windows of `eval.perplexity_window` tokens (at most the model's context) and measures
(`pipeline.core.perplexity`, `metrics.perplexity`):
  - `unedited()`: once per model, text and windows, cached in `paths.cache/perplexity/` with a
    checksum (a damaged entry is named in the log and recomputed);
  - `measure(updates)`: the model under a list of updates (none: the model as it is, e.g. with
    a sequential run's edits written in);
  - `over_edits(updates_per_edit)`: each edit alone, averaged over the edits.
`eval.perplexity=false` turns it off (`of` returns None).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig
from tqdm.auto import tqdm

from metrics import perplexity as ppl
from pipeline.app.corpora import held_out_text, statistics_corpus
from pipeline.app.editors import spec
from pipeline.app.stage import Run
from pipeline.core import files
from pipeline.core.editing.updates import Updates
from pipeline.core.models import LoadedModel, identity_of
from pipeline.core.perplexity import token_windows, window_nlls
from pipeline.core.tokens import tokenizer_identity

log = logging.getLogger(__name__)


class HeldOutPerplexity:
    def __init__(self, cfg: DictConfig, lm: LoadedModel):
        self.lm = lm
        self.text = held_out_text(cfg.corpus)
        self.window = min(int(cfg.eval.perplexity_window), lm.context_length)
        self.max_tokens = int(cfg.eval.perplexity_tokens)
        self.batch_size = int(cfg.eval.get("perplexity_batch", 4))
        self.windows = token_windows(
            lm.tokenizer, self.text.texts(), max_tokens=self.max_tokens, window=self.window
        )
        if not self.windows:
            raise ValueError(
                f"the held-out text {self.text.name} has fewer than {self.window} tokens: "
                "no perplexity window (eval.perplexity_window, or eval.perplexity=false)"
            )
        self.cache_dir = Path(cfg.paths.cache) / "perplexity" / f"{lm.name}-{cfg.dtype}"

    @classmethod
    def of(cls, cfg: DictConfig, lm: LoadedModel) -> HeldOutPerplexity | None:
        return cls(cfg, lm) if cfg.eval.get("perplexity", False) else None

    @property
    def tokens_per_window(self) -> int:
        return self.window - 1

    def describe(self) -> dict[str, Any]:
        """The text (files, digest), the tokens measured and how: for run.json and summaries."""
        return {
            **self.text.describe(),
            "tokens": len(self.windows) * self.window,
            "tokens_requested": self.max_tokens,
            "window": self.window,
            "windows": len(self.windows),
            "interval": ppl.INTERVAL,
        }

    def measure(self, updates: Sequence[Updates] = ()) -> dict[str, float]:
        """Perplexity of the model under `updates` (applied to the weights, then restored)."""
        nlls = window_nlls(self.lm, self.windows, updates, batch_size=self.batch_size)
        return ppl.perplexity(nlls, self.tokens_per_window)

    def over_edits(self, updates_per_edit: Sequence[Updates]) -> dict:
        """Each edit alone on the unedited model, averaged over the edits (metrics.perplexity)."""
        edits = tqdm(updates_per_edit, desc="perplexity under each edit", unit="edit")
        table = [
            window_nlls(self.lm, self.windows, [updates], batch_size=self.batch_size)
            for updates in edits
        ]
        return ppl.over_edits(table, self.tokens_per_window)

    def unedited(self) -> dict[str, float]:
        """The unedited model's perplexity, from the cache when an intact entry is there."""
        key = {
            "model": identity_of(self.lm),
            "dtype": str(self.lm.dtype),
            "tokenizer": tokenizer_identity(self.lm.tokenizer),
            "text": self.text.digest,
            "tokens": self.max_tokens,
            "window": self.window,
        }
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        path = self.cache_dir / f"{digest}.json"
        if path.exists():
            try:
                entry = files.read_json(path)
                if entry["key"] == key and entry["sha256"] == _checksum(entry["nlls"]):
                    return ppl.perplexity(entry["nlls"], self.tokens_per_window)
                log.warning("discarding the unedited perplexity in %s (checksum or key)", path)
            except (ValueError, KeyError, TypeError) as error:
                log.warning("discarding the unedited perplexity in %s (%s)", path, error)
        nlls = window_nlls(self.lm, self.windows, batch_size=self.batch_size)
        files.write_json(path, {"key": key, "nlls": nlls, "sha256": _checksum(nlls)})
        return ppl.perplexity(nlls, self.tokens_per_window)


def record_texts(cfg: DictConfig, run: Run, lm: LoadedModel) -> HeldOutPerplexity | None:
    """Record in run.json the text the key statistics read and the held-out perplexity text
    (files, sha256, tokens); the perplexity measurer, or None with `eval.perplexity=false`."""
    uses_keys = cfg.editor.name != "none" and spec(cfg.editor).needs_keys
    run.record(
        "statistics_text",
        statistics_corpus(cfg.corpus).describe()
        if uses_keys
        else f"none: editor {cfg.editor.name} uses no key statistics",
    )
    damage = HeldOutPerplexity.of(cfg, lm)
    if damage is not None:
        run.record("perplexity_text", damage.describe())
    return damage


def _checksum(nlls: Sequence[float]) -> str:
    return hashlib.sha256(json.dumps([float(x) for x in nlls]).encode()).hexdigest()
