"""Fluency and consistency against plain implementations of ROME's definitions on fixed text.

ROME (experiments/py/eval_utils_counterfact.py): GE = mean over a case's texts of
mean(2/3 * H(bigrams), 4/3 * H(trigrams)), entropies in bits over `nltk.word_tokenize` tokens,
case kept; RS = cosine of scikit-learn tf-idf vectors (lower-cased words of 2+ word characters,
raw counts times ROME's idf over ROME's vocabulary, L2-normalised) of the joined generations and
the joined reference snippets.
"""

import math
import re
from collections import Counter

import numpy as np
import pytest

from metrics.generation import (
    TfIdf,
    consistency,
    fluency,
    ngram_entropy,
    tfidf_words,
    tokenizer_name,
    word_tokens,
)

TEXT = 'The cat sat. The cat sat on the mat, didn\'t it? "Yes," it said. The The the.'
# nltk.word_tokenize(TEXT), written out: sentence-final periods split, "n't" split off, quotes
# turned into `` and '', case kept.
TOKENS = ["The", "cat", "sat", ".", "The", "cat", "sat", "on", "the", "mat", ",", "did", "n't",
          "it", "?", "``", "Yes", ",", "''", "it", "said", ".", "The", "The", "the", "."]  # fmt: skip


def rome_n_gram_entropy(tokens):
    """ROME's compute_n_gram_entropy, plainly: FreqDist of nltk.ngrams, -sum p log p / log 2."""
    entropies = []
    for n, weight in ((2, 2 / 3), (3, 4 / 3)):
        counts = Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))
        total = sum(counts.values())
        entropy = sum(-c / total * math.log(c / total) / math.log(2) for c in counts.values())
        entropies.append(weight * entropy)
    return sum(entropies) / len(entropies)


def rome_tfidf_similarity(a, b, vocabulary, idf):
    """ROME's tfidf_similarity with sklearn's TfidfVectorizer analysis, written out."""

    def vector(text):
        out = np.zeros(len(vocabulary))
        for word in re.findall(r"(?u)\b\w\w+\b", text.lower()):
            if word in vocabulary:
                out[vocabulary[word]] += 1
        out *= idf
        return out / np.linalg.norm(out)

    return float(vector(a) @ vector(b))


def test_word_tokens_are_nltk_word_tokenize():
    assert word_tokens(TEXT) == TOKENS
    assert "nltk" in tokenizer_name()
    nltk = pytest.importorskip("nltk")
    # Within one sentence nltk's word_tokenize is its Treebank tokenizer, whatever the punkt data.
    sentence = 'She said "no," didn\'t she?'
    assert word_tokens(sentence) == nltk.word_tokenize(sentence, preserve_line=True)


def test_ngram_entropy_equals_rome_on_fixed_text():
    assert ngram_entropy(TEXT) == pytest.approx(rome_n_gram_entropy(TOKENS), abs=1e-12)
    # Case is kept: "The The the" has two distinct bigrams (lower-casing would make it one).
    assert ngram_entropy("The The the") == pytest.approx((2 / 3 * 1.0 + 4 / 3 * 0.0) / 2)
    assert ngram_entropy("the the the the the") == 0.0  # pure repetition
    texts = [TEXT, "Paris is the capital of France. It is also its largest city."]
    assert fluency(texts) == pytest.approx(
        np.mean([rome_n_gram_entropy(word_tokens(t)) for t in texts]), abs=1e-12
    )
    assert math.isnan(fluency([]))


def test_ngram_entropy_by_hand():
    # "a b a b": bigrams ab, ba, ab -> p = (2/3, 1/3); trigrams aba, bab -> uniform over 2.
    h2 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    assert ngram_entropy("a b a b") == pytest.approx((2 / 3 * h2 + 4 / 3 * 1.0) / 2)
    assert ngram_entropy("one two three four five six") > ngram_entropy("one two one two one two")


def test_tfidf_equals_rome_with_a_fixed_vocabulary_and_idf():
    # ROME's files: tfidf_vocab.json maps word -> column, idf.npy holds one idf per column.
    vocabulary = {"paris": 3, "france": 0, "city": 1, "capital": 4, "is": 2, "said": 5}
    idf = np.array([2.5, 1.7, 1.0, 3.1, 2.2, 1.4])
    generations = ["Paris, I'd say: PARIS is a city in France.", "The capital is Paris."]
    references = ["France's capital city is Paris.", "Paris is in France"]
    # Single-character words ("I", "d", "a") and punctuation are not words to tf-idf.
    assert tfidf_words(generations[0]) == ["paris", "say", "paris", "is", "city", "in", "france"]
    expected = rome_tfidf_similarity(" ".join(generations), " ".join(references), vocabulary, idf)
    tfidf = TfIdf(vocabulary, idf)
    assert consistency(tfidf, generations, references) == pytest.approx(expected, abs=1e-12)
    assert 0 < expected < 1
    assert tfidf.similarity("paris france", "PARIS, France!") == pytest.approx(1.0)
    assert tfidf.similarity("unknown words", "paris") == 0.0  # ROME: NaN (0/0); here 0
    assert math.isnan(consistency(tfidf, ["x"], []))
    with pytest.raises(ValueError):
        TfIdf({"a": 0}, np.ones(2))


def test_fitted_stand_in_uses_sklearns_smoothed_idf():
    docs = ["paris is in france", "berlin is in germany", "rome is in italy"]
    tfidf = TfIdf.fit(docs)
    # idf of "is" (in every document) = log(4/4) + 1 = 1; of "paris" = log(4/2) + 1.
    assert tfidf.idf[tfidf.vocabulary["is"]] == pytest.approx(1.0)
    assert tfidf.idf[tfidf.vocabulary["paris"]] == pytest.approx(math.log(2) + 1)
    assert tfidf.similarity("paris france", "berlin germany") == 0.0
    assert tfidf.similarity("paris is nice", "paris") > tfidf.similarity("paris is nice", "is")
    assert np.linalg.norm(tfidf.vector("paris paris is")) == pytest.approx(1.0)


def test_without_romes_tfidf_files_rs_is_not_computed_under_its_name(tmp_path):
    """RS needs ROME's idf, vocabulary and attribute snippets; without them the records carry
    GE and no RS (Table 4 leaves it blank and says why), never a stand-in called RS."""
    from omegaconf import OmegaConf

    from pipeline.app.generation_scores import Reference, generation_metrics
    from pipeline.data.records import load_counterfact
    from tests.conftest import ROOT, tiny_model

    cases = load_counterfact(
        ROOT / "data/samples/counterfact-first1000_sample.json", limit=1
    ).records
    references = Reference(tmp_path, cases)
    assert references.tfidf is None and "not in" in references.source
    cfg = OmegaConf.create({"seed": 0, "eval": {"max_new_tokens": 4, "top_k": 5}})
    (scores,) = generation_metrics(tiny_model("tiny-gpt2"), cases, [None], cfg, references)
    assert "RS" not in scores and math.isfinite(scores["GE"])
    assert len(scores["texts"]) == len(cases[0].generation_prompts) == 10
