"""The statistics stage end to end on a tiny model: cache, shards and their merge."""

import json
import os
import stat

import torch

from pipeline.core.second_moment import load_second_moment
from tests.test_stages import merge, run_stage

TEXT = """The Eiffel Tower is located in Paris, the capital of France.

Danielle Darrieux was a French actress of stage, television and film.

Toyota Corolla is produced by Toyota, a company based in Japan.

Michel Rocard was a French politician who served as Prime Minister.

The mother tongue of Jean Galland is French, and he sang in it.

Apple A5 was created by Apple; the chip powered the iPhone 4S and the iPad 2.
"""


def stats(tmp_path, *overrides):
    corpus = tmp_path / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    (corpus / "text.txt").write_text(TEXT * 3)
    done = run_stage(
        "stats",
        "model=tiny-gpt2",
        f"corpus.local_dir={corpus}",
        f"paths.cache={tmp_path / 'cache'}",
        f"paths.results={tmp_path / 'results'}",
        "editor.mom2.batch_size=2",
        *overrides,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "results/stats/tiny-gpt2/wikipedia/summary.json").read_text())
    return summary, done.stdout


def test_stats_cache_and_sharded_merge(tmp_path):
    """Shards batch other texts together, so every key comes from a forward pass of another
    shape: the kernels may sum in another order and the keys differ in their last bits. The
    model runs in float64 so that bound is tight: a key off by a relative r moves each product
    k_i k_j by at most 2r|k_i||k_j| (+ one rounding), and by Cauchy-Schwarz
    sum |k_i||k_j| <= sqrt(S_ii S_jj). A forward pass of this depth rounds keys by far less than
    r = 1e-12 in float64 (about 1e4 ulps); a key left out, doubled or taken from the wrong layer
    moves entries by O(1) of that scale. (In float32, r is ~1e-6 and the CPU decides it.)"""
    whole, out = stats(tmp_path / "one", "dtype=float64")
    (row,) = whole["layers"]
    assert row["layer"] == 1 and row["keys"] > 100 and not row["cached"]
    assert whole["corpus"] == "wikipedia-local"
    again, out = stats(tmp_path / "one", "dtype=float64")
    assert again["layers"][0]["cached"] and "from the cache" in out

    for index in (1, 0):
        stats(tmp_path / "two", "dtype=float64", "shard.count=2", f"shard.index={index}")
    done = merge(tmp_path / "two/results/stats/tiny-gpt2/wikipedia")  # from the shards' config
    assert done.returncode == 0, done.stderr[-3000:]
    merged = json.loads(
        (tmp_path / "two/results/stats/tiny-gpt2/wikipedia/summary.json").read_text()
    )
    a = load_second_moment(row["path"])
    b = load_second_moment(merged["layers"][0]["path"])
    assert a.count == b.count == row["keys"]
    assert a.sum.dtype == torch.float64
    scale = a.sum.diagonal().sqrt()
    bound = 2e-12 * torch.outer(scale, scale)
    assert bool(((a.sum - b.sum).abs() <= bound).all()), ((a.sum - b.sum).abs() / bound).max()


def test_every_file_written_follows_the_umask(tmp_path):
    """safetensors writes 0600: the statistics (and the converted model) were unreadable to the
    group on a shared cache while the results next to them were not."""
    old = os.umask(0o002)
    try:
        stats(tmp_path)
    finally:
        os.umask(old)
    written = [p for p in tmp_path.rglob("*") if p.is_file() and p.parent.name != "corpus"]
    assert any(p.suffix == ".safetensors" for p in written)
    modes = {str(p.relative_to(tmp_path)): oct(stat.S_IMODE(p.stat().st_mode)) for p in written}
    assert set(modes.values()) == {"0o664"}, modes


def test_merge_with_a_missing_part_fails_clearly(tmp_path):
    stats(tmp_path, "shard.count=2", "shard.index=0")
    corpus = tmp_path / "corpus"
    done = run_stage(
        "stats",
        "model=tiny-gpt2",
        f"corpus.local_dir={corpus}",
        f"paths.cache={tmp_path / 'cache'}",
        f"paths.results={tmp_path / 'results'}",
        "shard.count=2",
        "aggregate_only=true",
    )
    assert done.returncode != 0
    assert "shard parts [1] of 2 are missing" in done.stderr


def test_without_a_corpus_the_bundled_sample_is_used_and_named(tmp_path):
    done = run_stage(
        "stats",
        "model=tiny-gpt2",
        f"paths.data={tmp_path / 'empty'}",
        f"paths.cache={tmp_path / 'cache'}",
        f"paths.results={tmp_path / 'results'}",
        "editor.mom2.max_tokens=2000",
        "editor.mom2.batch_size=4",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    logged = done.stdout + done.stderr  # Hydra logs to stdout
    assert "the key statistics use the small sample bundled in data/samples" in logged
    assert "corpus: wikitext-sample, the small WikiText sample bundled" in done.stdout
    summary = json.loads((tmp_path / "results/stats/tiny-gpt2/wikipedia/summary.json").read_text())
    assert summary["corpus"] == "wikitext-sample"
    assert summary["corpus_origin"] == "bundled sample"
    (row,) = summary["layers"]
    assert row["keys"] == 2000 and "/wikitext-sample/" in row["path"]
    assert load_second_moment(row["path"]).count == 2000


def test_another_corpus_directory_is_not_reported_cached(tmp_path):
    """Issue 30 item 1: the same command with another `corpus.local_dir` reported `cached: true`
    and every key-value editor used the first corpus' C."""
    first, _ = stats(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    (other / "text.txt").write_text(TEXT.replace("French", "Dutch") * 3)
    second, out = stats(tmp_path, f"corpus.local_dir={other}")
    (a,), (b,) = first["layers"], second["layers"]
    assert not b["cached"] and "from the cache" not in out
    assert a["path"] != b["path"]
    assert not torch.equal(load_second_moment(a["path"]).sum, load_second_moment(b["path"]).sum)
    assert second["statistics_text"]["files"][0]["path"] == str(other / "text.txt")


def test_a_statistic_recomputed_after_a_bad_checksum_is_not_reported_cached(tmp_path):
    """Issue 30 item 15: the file was discarded and recomputed, then reported "from the cache"."""
    first, _ = stats(tmp_path)
    path = first["layers"][0]["path"]
    with open(path, "rb+") as handle:  # one flipped byte near the end, in the tensor data
        handle.seek(-100, 2)
        byte = handle.read(1)
        handle.seek(-100, 2)
        handle.write(bytes([byte[0] ^ 0xFF]))
    again, out = stats(tmp_path)
    assert not again["layers"][0]["cached"] and "from the cache" not in out
    assert "computed together" in out
    third, out = stats(tmp_path)
    assert third["layers"][0]["cached"] and "from the cache" in out
