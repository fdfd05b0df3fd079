import bz2

import pytest

from pipeline.data import corpus
from pipeline.data.corpus import (
    CorpusNotAvailableError,
    detokenize_wikitext,
    has_hf_cache,
    read_hf_wikitext,
    read_local,
    read_mediawiki_dump,
    read_sample,
    read_wikitext_raw,
    sample_from_model,
    strip_wiki_markup,
)
from tests.conftest import tiny_model

ARTICLE = """{{Infobox person|name=Ada Lovelace|birth_date={{birth date|1815|12|10}}}}
'''Augusta Ada King, Countess of Lovelace''' was an English [[mathematician]] and [[Writing|writer]],
chiefly known for her work on [[Charles Babbage]]'s proposed [[Analytical Engine]].<ref name="a">Toole, p. 1</ref>
[[File:Ada Lovelace portrait.jpg|thumb|A portrait of [[Ada Lovelace]]]]

== Early life ==

{| class="wikitable"
| cell || cell
|}
She was the only legitimate child of the poet [[Lord Byron]] and mathematician <!-- hidden -->Lady Byron, see [https://example.org the archive].
[[Category:1815 births]]
"""

DUMP = f"""<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/">
<page><title>Ada Lovelace</title><ns>0</ns><revision><text>{ARTICLE.replace("&", "&amp;").replace("<", "&lt;")}</text></revision></page>
<page><title>Old name</title><ns>0</ns><revision><text>#REDIRECT [[Ada Lovelace]]</text></revision></page>
<page><title>Talk:Ada</title><ns>1</ns><revision><text>A talk page that is long enough to be kept if it were an article, surely.</text></revision></page>
</mediawiki>"""


def test_strip_wiki_markup():
    text = strip_wiki_markup(ARTICLE)
    for gone in (
        "{{",
        "}}",
        "[[",
        "]]",
        "'''",
        "<ref",
        "Infobox",
        "Category",
        "File:",
        "wikitable",
        "hidden",
        "==",
    ):
        assert gone not in text, gone
    assert "was an English mathematician and writer" in text
    assert "Charles Babbage's proposed Analytical Engine." in text
    assert "Lady Byron, see the archive." in text


def test_read_mediawiki_dump_bz2(tmp_path):
    path = tmp_path / "dump.xml.bz2"
    path.write_bytes(bz2.compress(DUMP.encode()))
    paragraphs = list(read_mediawiki_dump(path))
    assert len(paragraphs) == 2  # the article's two paragraphs; no redirect, no talk page
    assert paragraphs[0].startswith("Augusta Ada King")


def test_wikitext_raw_and_tokens(tmp_path):
    raw = tmp_path / "wiki.test.raw"
    raw.write_text(
        " = Robert Boulter = \n\n Robert Boulter is an English film , television and theatre actor . He had a guest @-@ starring role .\n"
    )
    (line,) = read_wikitext_raw(raw)
    assert (
        line
        == "Robert Boulter is an English film, television and theatre actor. He had a guest-starring role."
    )
    assert (
        detokenize_wikitext('the 1 @,@ 000 ( big ) dog \'s " toy "')
        == 'the 1,000 (big) dog\'s "toy"'
    )
    (tmp_path / "b.tokens").write_text(" = = Career = = \n A second line @-@ here .\n")
    assert list(read_local(tmp_path)) == ["A second line-here.", line]  # sorted by name


def test_sample_from_model_is_seeded():
    lm = tiny_model("tiny-gpt2")
    a = sample_from_model(lm.model, lm.tokenizer, 3, length=8, seed=1)
    b = sample_from_model(lm.model, lm.tokenizer, 3, length=8, seed=1)
    assert a == b and len(a) == 3 and all(isinstance(t, str) and t for t in a)


def test_bundled_sample_is_plain_wikitext_prose():
    texts = list(read_sample())
    assert len(texts) > 400
    assert texts[0].startswith("Robert Boulter is an English film, television and theatre actor.")
    assert not any(t.startswith("=") for t in texts)  # headings dropped
    assert " @-@ " not in " ".join(texts)  # detokenized
    assert 250_000 < sum(len(t) for t in texts) < 400_000
    with pytest.raises(CorpusNotAvailableError, match="missing"):
        list(read_sample("no-such-sample.txt"))


def test_datasets_cache_is_detected(tmp_path):
    assert not has_hf_cache(tmp_path) and not has_hf_cache(tmp_path / "absent")
    assert not has_hf_cache(None)
    (tmp_path / "Salesforce___wikitext").mkdir()
    assert has_hf_cache(tmp_path)


def test_wikitext_offline_is_one_clear_error(tmp_path, monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'wikitext' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(CorpusNotAvailableError) as caught:
        next(read_hf_wikitext(cache_dir=tmp_path))
    message = str(caught.value)
    assert "\n" not in message
    assert f"not cached in {tmp_path}" in message and "Couldn't reach 'wikitext'" in message
    for remedy in ("make data", "ROME_DATA=", "corpus.source=sample"):
        assert remedy in message
    assert corpus.CorpusNotAvailableError is CorpusNotAvailableError
