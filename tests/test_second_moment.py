"""Key statistics: streaming, budgets, sharding and the disk cache."""

from __future__ import annotations

import threading

import pytest
import torch

from pipeline.core.second_moment import (
    SecondMoment,
    StatsKey,
    cached_second_moment,
    cached_second_moments,
    merge,
    second_moment,
    second_moments,
    token_chunks,
)
from tests.conftest import tiny_model

LAYER = 1
CORPUS = [
    "The Eiffel Tower is located in Paris, the capital of France.",
    "",
    "   ",
    "Danielle Darrieux was a French actress of stage, television and film.",
    "Toyota Corolla is produced by Toyota, a company based in Japan.",
    "Michel Rocard was a French politician who served as Prime Minister.",
    "The mother tongue of Jean Galland is French, and he sang in it.",
    "Go.",
    "Apple A5 was created by Apple; the chip powered the iPhone 4S and the iPad 2.",
    "BBC One is owned by the BBC, a public broadcaster in the United Kingdom.",
]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and do not thrash next to other jobs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def lm():
    return tiny_model("tiny-gpt2")


def direct_second_moment(lm, layer, chunks):
    """Σ k kᵀ by running every chunk alone, with a hook on the projection."""
    keys = []
    handle = lm.module("mlp_out", layer).register_forward_pre_hook(
        lambda module, args: keys.append(args[0][0])
    )
    try:
        with torch.no_grad():
            for chunk in chunks:
                lm.model(input_ids=torch.tensor([chunk]))
    finally:
        handle.remove()
    stacked = torch.cat(keys).double()
    return stacked.T @ stacked, stacked.shape[0]


def test_streaming_equals_direct_computation(lm):
    chunks = list(token_chunks(lm.tokenizer, CORPUS, max_length=7))
    assert max(len(c) for c in chunks) == 7 and min(len(c) for c in chunks) < 7
    expected_sum, expected_count = direct_second_moment(lm, LAYER, chunks)
    stat = second_moment(lm, LAYER, CORPUS, max_length=7, batch_size=3, progress=False)
    assert stat.count == expected_count == sum(len(c) for c in chunks)
    assert stat.sum.dtype == torch.float64
    torch.testing.assert_close(stat.sum, expected_sum, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stat.moment(), expected_sum / expected_count, rtol=1e-5, atol=1e-6)


def test_budgets_count_samples_and_tokens(lm):
    lengths = [len(lm.tokenizer(t)["input_ids"]) for t in CORPUS if t.strip()]
    by_samples = second_moment(lm, LAYER, CORPUS, max_samples=3, progress=False)
    assert by_samples.count == sum(lengths[:3])  # blank texts are not samples
    by_tokens = second_moment(lm, LAYER, CORPUS, max_tokens=25, max_length=4, progress=False)
    assert by_tokens.count == 25
    float32 = second_moment(lm, LAYER, CORPUS, accumulate_dtype=torch.float32, progress=False)
    assert float32.sum.dtype == torch.float32


def test_shards_merge_into_the_single_job(lm):
    single = second_moment(lm, LAYER, CORPUS, max_length=5, batch_size=2, progress=False)
    parts = [
        second_moment(
            lm, LAYER, CORPUS, max_length=5, batch_size=2, shard=i, num_shards=3, progress=False
        )
        for i in range(3)
    ]
    assert all(part.count > 0 for part in parts)
    merged = merge(parts)
    assert merged.count == single.count
    # Same batches in every layout: only the order of float64 additions differs.
    torch.testing.assert_close(merged.sum, single.sum, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError):
        second_moment(lm, LAYER, CORPUS, shard=3, num_shards=3, progress=False)
    with pytest.raises(ValueError):
        SecondMoment.zeros(4).moment()


class CountingCorpus:
    """A corpus callable that records how often the statistic was actually computed."""

    def __init__(self):
        self.calls = 0
        self.lock = threading.Lock()

    def __call__(self):
        with self.lock:
            self.calls += 1
        return iter(CORPUS)


def cached(lm, tmp_path, corpus):
    key = StatsKey.of(lm, LAYER, "inline", max_samples=6)
    return cached_second_moment(lm, key, corpus, cache_dir=tmp_path, progress=False)


def test_cache_computes_once_and_detects_corruption(lm, tmp_path):
    corpus = CountingCorpus()
    first = cached(lm, tmp_path, corpus)
    path = StatsKey.of(lm, LAYER, "inline", max_samples=6).path(tmp_path)
    assert path.exists() and corpus.calls == 1
    again = cached(lm, tmp_path, corpus)
    assert corpus.calls == 1 and torch.equal(again.sum, first.sum) and again.count == first.count

    # One flipped byte inside the tensor data: the checksum catches it.
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF
    path.write_bytes(bytes(data))
    recomputed = cached(lm, tmp_path, corpus)
    assert corpus.calls == 2 and torch.equal(recomputed.sum, first.sum)

    # A partial write (truncated file) is detected too, and the entry is rewritten whole.
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    recomputed = cached(lm, tmp_path, corpus)
    assert corpus.calls == 3 and torch.equal(recomputed.sum, first.sum)
    assert cached(lm, tmp_path, corpus).count == first.count and corpus.calls == 3
    assert not list(path.parent.glob("*.tmp*"))


def test_layers_in_one_pass_equal_each_layer_alone(lm):
    """One pass with hooks at several layers gives each layer's sum bit for bit."""
    together = second_moments(lm, [1, 0, -1], CORPUS, max_length=7, batch_size=3, progress=False)
    assert sorted(together) == [0, 1, lm.n_layers - 1]
    for layer, stat in together.items():
        alone = second_moment(lm, layer, CORPUS, max_length=7, batch_size=3, progress=False)
        assert torch.equal(stat.sum, alone.sum) and stat.count == alone.count


def test_cache_computes_only_the_missing_layers_in_one_pass(lm, tmp_path):
    corpus = CountingCorpus()
    keys = [StatsKey.of(lm, layer, "inline", max_samples=6) for layer in (0, 1, 2)]
    first = cached_second_moments(lm, keys[1:2], corpus, cache_dir=tmp_path, progress=False)
    assert corpus.calls == 1
    stats = cached_second_moments(lm, keys, corpus, cache_dir=tmp_path, progress=False)
    assert corpus.calls == 2 and sorted(stats) == [0, 1, 2]  # layers 0 and 2 in one pass
    assert torch.equal(stats[1].sum, first[1].sum)
    assert all(key.path(tmp_path).exists() for key in keys)
    again = cached_second_moments(lm, keys, corpus, cache_dir=tmp_path, progress=False)
    assert corpus.calls == 2 and all(torch.equal(again[x].sum, stats[x].sum) for x in stats)
    other = StatsKey.of(lm, 3, "inline", max_samples=7)
    with pytest.raises(ValueError, match="differ in corpus or budget"):
        cached_second_moments(lm, [keys[0], other], corpus, cache_dir=tmp_path)


def test_concurrent_jobs_compute_once(lm, tmp_path):
    corpus = CountingCorpus()
    results = [None, None]

    def job(slot):
        results[slot] = cached(lm, tmp_path, corpus)

    threads = [threading.Thread(target=job, args=(slot,)) for slot in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert corpus.calls == 1
    assert torch.equal(results[0].sum, results[1].sum)


def test_cached_shard_parts_merge_into_the_cached_whole(lm, tmp_path):
    from pipeline.core.second_moment import load_second_moment, merge_shards

    def part(index):
        return cached_second_moment(
            lm, key, CORPUS, cache_dir=tmp_path, batch_size=2, shard=(index, 3), progress=False
        )

    key = StatsKey.of(lm, LAYER, "inline")
    part(0), part(2)
    with pytest.raises(FileNotFoundError, match=r"\[1\] of 3"):
        merge_shards(key, tmp_path, 3)
    part(1)
    merged = merge_shards(key, tmp_path, 3)
    whole = second_moment(lm, LAYER, CORPUS, batch_size=2, progress=False)
    assert merged.count == whole.count
    torch.testing.assert_close(merged.sum, whole.sum, rtol=1e-12, atol=1e-12)
    assert load_second_moment(key.path(tmp_path), key.metadata()).count == whole.count


def test_the_count_header_is_inside_the_checksum(lm, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    corpus = CountingCorpus()
    first = cached(lm, tmp_path, corpus)
    path = StatsKey.of(lm, LAYER, "inline", max_samples=6).path(tmp_path)
    with safe_open(str(path), framework="pt") as handle:
        header, tensor = dict(handle.metadata()), handle.get_tensor("sum")
    header["count"] = str(int(header["count"]) + 1)  # one digit: C silently rescaled
    save_file({"sum": tensor}, str(path), metadata=header)
    recomputed = cached(lm, tmp_path, corpus)
    assert corpus.calls == 2 and recomputed.count == first.count


def test_another_model_under_the_same_name_misses_the_cache(lm, tmp_path):
    other = tiny_model("tiny-gpt2", seed=1)  # same name, dtype and shapes; other weights
    assert other.name == lm.name and other.identity != lm.identity
    mine = StatsKey.of(lm, LAYER, "inline", max_samples=6)
    theirs = StatsKey.of(other, LAYER, "inline", max_samples=6)
    assert mine.path(tmp_path) != theirs.path(tmp_path)
    corpus = CountingCorpus()
    cached(lm, tmp_path, corpus)
    cached(other, tmp_path, corpus)
    assert corpus.calls == 2  # computed for each
    with pytest.raises(ValueError, match="does not describe"):
        cached_second_moment(other, mine, corpus, cache_dir=tmp_path, progress=False)
