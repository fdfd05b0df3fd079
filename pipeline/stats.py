"""Stage `stats`: key statistics for ROME, computed ahead of editing and cached.

    python -m pipeline.stats [model=...] [editor=rome] [layers=[17]] [editor.mom2.max_tokens=N]
    python -m pipeline.stats shard.index=i shard.count=n     # part i of n (any order, any host)
    python -m pipeline.stats shard.count=n aggregate_only=true   # the full statistic from the n parts
    python -m pipeline.merge results/stats/<model>/<corpus>   # the same, from a shard's config

The statistic lands in the shared cache (`paths.cache/stats/...`), keyed by model, layer, corpus,
budget and dtypes, with a checksum; editing stages load it from there. The layers not cached yet
are computed together, in one pass over the corpus that stops at the highest of them (MEMIT's
five layers cost about what its top layer costs alone). `summary.json` records keys counted,
seconds and tokens/s (of the shared pass) per layer.
"""

from __future__ import annotations

import logging
import time

from omegaconf import DictConfig

from pipeline.app.corpora import statistics_corpus
from pipeline.app.editors import edit_layers, key_statistics, stats_key
from pipeline.app.stage import Run, stage
from pipeline.core.second_moment import merge_shards

log = logging.getLogger(__name__)


@stage("stats")
def main(cfg: DictConfig, run: Run) -> None:
    lm = run.load_model()
    layers = list(cfg.layers) if cfg.layers is not None else edit_layers(cfg.editor, lm.name)
    index, count = int(cfg.shard.index), int(cfg.shard.count)
    keys = [stats_key(cfg, lm, layer)[0] for layer in layers]
    shard = (index, count) if count > 1 and not cfg.aggregate_only else None
    paths = [key.path(cfg.paths.cache, shard) for key in keys]
    started = time.perf_counter()
    if cfg.aggregate_only and count > 1:
        stats = {key.layer: merge_shards(key, cfg.paths.cache, count) for key in keys}
    else:  # the layers not cached yet in one pass over the corpus
        stats = key_statistics(cfg, lm, layers, shard=shard)
    seconds = time.perf_counter() - started
    # What was loaded, not what existed: a file discarded for a bad checksum was recomputed.
    cached = [stats[key.layer].from_cache for key in keys]
    computed = [key.layer for key, hit in zip(keys, cached, strict=True) if not hit]
    rows = []
    for key, path, hit in zip(keys, paths, cached, strict=True):
        stat = stats[key.layer]
        rows.append(
            {
                "layer": key.layer,
                "keys": stat.count,
                "cached": hit,
                "seconds": None if hit else round(seconds, 3),  # the shared pass's
                "tokens_per_second": None if hit else round(stat.count / seconds, 1),
                "path": str(path),
            }
        )
        speed = "from the cache" if hit else f"{stat.count / seconds:.0f} tokens/s"
        print(f"layer {key.layer}: {stat.count} keys ({speed}) -> {path}")
    if computed:
        print(f"layers {computed} computed together in {seconds:.1f} s (one pass over the corpus)")
    text = statistics_corpus(cfg.corpus)
    if text.origin == "bundled sample":
        print(
            f"corpus: {text.name}, the small WikiText sample bundled in data/samples/"
            f"{cfg.corpus.sample}: enough to try editing, not for the paper's numbers"
        )
    run.record("statistics_text", text.describe())
    run.write_summary(
        {
            "model": lm.name,
            "corpus": text.name,
            "corpus_origin": text.origin,
            "statistics_text": text.describe(),
            "shard": {"index": index, "count": count},
            "merged": bool(cfg.aggregate_only),
            "layers": rows,
        }
    )


if __name__ == "__main__":
    main()
