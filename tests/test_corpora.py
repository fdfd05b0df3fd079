"""The texts the config names: the statistics' corpus, the held-out text, content digests."""

from __future__ import annotations

import pytest

from pipeline.app import corpora, editors
from pipeline.data import corpus
from tests.conftest import tiny_model
from tests.test_editors import config

HELD_OUT = "wikitext-2-raw.wiki.test.raw"


def test_corpus_source(tmp_path):
    empty = config(f"paths.data={tmp_path}", "corpus.source=local")
    with pytest.raises(FileNotFoundError, match="no corpus files"):
        corpora.statistics_corpus(empty.corpus)
    # auto with nothing in the data root: the bundled sample, named as such.
    text = corpora.statistics_corpus(config(f"paths.data={tmp_path}").corpus)
    assert text.name == "wikitext-sample" and text.origin == "bundled sample"
    assert next(iter(text.texts())).startswith("Robert Boulter is an English film")
    assert corpora.statistics_corpus(config("corpus.source=sample").corpus).name == (
        "wikitext-sample"
    )
    # auto with WikiText cached by `datasets` in the data root (make data): that.
    (tmp_path / "hf_datasets" / "Salesforce___wikitext").mkdir(parents=True)
    text = corpora.statistics_corpus(config(f"paths.data={tmp_path}").corpus)
    assert text.name == "wikitext-103-raw-v1" and text.dataset == ("wikitext-103-raw-v1", "train")
    held = corpora.held_out_text(config(f"paths.data={tmp_path}").corpus)
    assert held.dataset == ("wikitext-103-raw-v1", "test")
    # auto with local text in the data root: the local text, first.
    (tmp_path / "wikipedia").mkdir()
    (tmp_path / "wikipedia" / "a.txt").write_text("First paragraph of text.\n\nSecond paragraph.\n")
    text = corpora.statistics_corpus(config(f"paths.data={tmp_path}").corpus)
    assert text.name == "wikipedia-local"
    assert list(text.texts()) == ["First paragraph of text.", "Second paragraph."]
    with pytest.raises(ValueError, match="sample"):
        corpora.statistics_corpus(config("corpus.source=web").corpus)


def test_the_statistics_never_read_the_held_out_file(tmp_path):
    """The data root's layout: a dump, WikiText-2's validation and test files. The statistics
    read the first two; perplexity reads the test file alone; run.json gets both digests."""
    root = tmp_path / "wikipedia"
    root.mkdir()
    (root / "wikitext-2.valid.tokens").write_text(" = Valid = \n Validation text .\n")
    (root / HELD_OUT).write_text(" = Test = \n Held-out text .\n")
    cfg = config(f"paths.data={tmp_path}")
    stats, held = corpora.statistics_corpus(cfg.corpus), corpora.held_out_text(cfg.corpus)
    assert [path for path, _ in stats.files] == [str(root / "wikitext-2.valid.tokens")]
    assert list(stats.texts()) == ["Validation text."]
    assert [path for path, _ in held.files] == [str(root / HELD_OUT)]
    assert list(held.texts()) == ["Held-out text."]
    described = stats.describe()
    assert described["files"][0]["sha256"] == corpora.file_digest(root / "wikitext-2.valid.tokens")
    assert described["sha256"] == stats.digest != held.digest
    # Only the held-out file there: nothing for the statistics, said so.
    (root / "wikitext-2.valid.tokens").unlink()
    with pytest.raises(FileNotFoundError, match="besides the held-out"):
        corpora.statistics_corpus(config(f"paths.data={tmp_path}", "corpus.source=local").corpus)


def test_a_local_directory_without_the_held_out_file_uses_the_samples_held_out_part(tmp_path):
    (tmp_path / "wikipedia").mkdir()
    (tmp_path / "wikipedia" / "a.txt").write_text("Some text.\n")
    held = corpora.held_out_text(config(f"paths.data={tmp_path}").corpus)
    assert held.origin == "bundled sample" and held.part.startswith("held_out")


def test_the_sample_is_split_into_disjoint_parts_at_an_article(tmp_path):
    cfg = config(f"paths.data={tmp_path}")
    stats, held = corpora.statistics_corpus(cfg.corpus), corpora.held_out_text(cfg.corpus)
    first, last = list(stats.texts()), list(held.texts())
    assert first + last == list(corpus.read_sample())  # nothing lost, nothing read twice
    assert not set(first) & set(last)
    # The held-out part starts with a whole article, in the last quarter of the characters.
    assert last[0].startswith("Temnospondyli")
    total = sum(map(len, first + last))
    assert 0.2 < sum(map(len, last)) / total <= 0.25
    assert stats.files == held.files and stats.digest != held.digest  # one file, two parts
    with pytest.raises(ValueError, match="fraction"):
        list(corpus.read_sample(part="held_out", held_out_fraction=1.5))


def test_the_statistics_key_is_the_texts_content_not_its_name(tmp_path):
    """Issue 30 item 1: two directories of other text were both `wikipedia-local`, one cache
    file; the same text under another path is the same statistic."""
    lm = tiny_model("tiny-gpt2")
    keys = {}
    for name, text in (("a", "Some text.\n"), ("b", "Other text.\n"), ("c", "Some text.\n")):
        (tmp_path / name / "wikipedia").mkdir(parents=True)
        (tmp_path / name / "wikipedia" / "x.txt").write_text(text)
        cfg = config("model=tiny-gpt2", f"paths.data={tmp_path / name}")
        keys[name], _ = editors.stats_key(cfg, lm, 1)
    assert keys["a"].corpus == keys["b"].corpus == "wikipedia-local"
    assert keys["a"].path(tmp_path) != keys["b"].path(tmp_path)
    assert keys["a"].metadata()["corpus_sha256"] != keys["b"].metadata()["corpus_sha256"]
    assert keys["a"].path(tmp_path) == keys["c"].path(tmp_path)
    sample, _ = editors.stats_key(config("model=tiny-gpt2", f"paths.data={tmp_path}"), lm, 1)
    assert sample.corpus == "wikitext-sample" and "wikitext-sample" in str(sample.path(tmp_path))
    assert sample.path(tmp_path) != keys["a"].path(tmp_path)
