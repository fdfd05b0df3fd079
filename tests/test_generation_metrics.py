"""Fluency and consistency metrics on hand-computed examples."""

import math

import numpy as np
import pytest

from metrics.generation import TfIdf, consistency, fluency, ngram_entropy, words


def test_ngram_entropy_by_hand():
    # "a b a b": bigrams ab, ba, ab -> p = (2/3, 1/3); trigrams aba, bab -> uniform over 2.
    h2 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    h3 = 1.0
    assert ngram_entropy("a b a b") == pytest.approx((2 / 3 * h2 + 4 / 3 * h3) / 2)
    assert ngram_entropy("the the the the the") == 0.0  # pure repetition
    assert ngram_entropy("one two three four five six") > ngram_entropy("one two one two one two")
    assert fluency(["a b a b", "the the the"]) == pytest.approx(ngram_entropy("a b a b") / 2)
    assert math.isnan(fluency([]))


def test_tfidf_similarity():
    docs = ["paris is in france", "berlin is in germany", "rome is in italy"]
    tfidf = TfIdf.fit(docs)
    assert words("Paris, France.") == ["paris", ",", "france", "."]
    # idf of "is" (in every document) = log(4/4) + 1 = 1; of "paris" = log(4/2) + 1.
    assert tfidf.idf[tfidf.vocabulary["is"]] == pytest.approx(1.0)
    assert tfidf.idf[tfidf.vocabulary["paris"]] == pytest.approx(math.log(2) + 1)
    assert tfidf.similarity("paris france", "paris france") == pytest.approx(1.0)
    assert tfidf.similarity("paris france", "berlin germany") == 0.0
    assert tfidf.similarity("paris is nice", "paris") > tfidf.similarity("paris is nice", "is")
    vector = tfidf.vector("paris paris is")
    assert np.linalg.norm(vector) == pytest.approx(1.0)
    assert consistency(tfidf, ["Paris is in France"], ["france"]) > 0
    assert math.isnan(consistency(tfidf, ["x"], []))
    with pytest.raises(ValueError):
        TfIdf({"a": 0}, np.ones(2))
