"""Generation metrics: fluency GE (n-gram entropy) and consistency RS (tf-idf similarity).

GE (Meng et al. 2022, after Zhang et al. 2018): for a text, the entropy in bits of its bigram and
trigram frequency distributions, weighted 2/3 and 4/3 and averaged; a case's GE is the mean over
its generations. Repetitive text (a common failure of over-strong edits) scores low.

RS: the cosine similarity of tf-idf vectors between the case's generations (joined) and reference
text about the new target (Wikipedia snippets in ROME's `attribute_snippets.json`).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

WORD = re.compile(r"\w+|[^\w\s]")


def words(text: str) -> list[str]:
    """Lower-cased word and punctuation tokens."""
    return WORD.findall(text.lower())


def ngram_entropy(
    text: str, orders: Sequence[int] = (2, 3), weights: Sequence[float] = (2 / 3, 4 / 3)
) -> float:
    """The weighted mean over `orders` of the entropy (bits) of the text's n-gram distribution."""
    tokens = words(text)
    entropies = []
    for n in orders:
        counts = np.array(
            list(Counter(zip(*(tokens[i:] for i in range(n)), strict=False)).values()),
            dtype=np.float64,
        )
        if counts.size == 0:
            entropies.append(0.0)
            continue
        p = counts / counts.sum()
        entropies.append(float(-(p * np.log2(p)).sum()))
    return float(np.mean(np.asarray(entropies) * np.asarray(weights)))


def fluency(texts: Iterable[str]) -> float:
    """GE of one case: the mean n-gram entropy of its generations."""
    values = [ngram_entropy(text) for text in texts]
    return float(np.mean(values)) if values else math.nan


class TfIdf:
    """tf-idf vectors over a fixed vocabulary and idf (ROME's `idf.npy` + `tfidf_vocab.json`,
    or `fit` on a corpus)."""

    def __init__(self, vocabulary: Mapping[str, int], idf: np.ndarray):
        if len(idf) != len(vocabulary):
            raise ValueError(f"idf has {len(idf)} entries for {len(vocabulary)} words")
        self.vocabulary = dict(vocabulary)
        self.idf = np.asarray(idf, dtype=np.float64)

    @classmethod
    def fit(cls, documents: Iterable[str], min_count: int = 1) -> TfIdf:
        """Smoothed idf, log((1 + N) / (1 + df)) + 1, over the documents' words."""
        frequency: Counter[str] = Counter()
        n_documents = 0
        for document in documents:
            n_documents += 1
            frequency.update(set(words(document)))
        vocabulary = sorted(w for w, c in frequency.items() if c >= min_count)
        idf = np.array([math.log((1 + n_documents) / (1 + frequency[w])) + 1 for w in vocabulary])
        return cls({w: i for i, w in enumerate(vocabulary)}, idf)

    def vector(self, text: str) -> np.ndarray:
        """The L2-normalised tf-idf vector of a text (zero if none of its words is known)."""
        out = np.zeros(len(self.vocabulary))
        for word, count in Counter(words(text)).items():
            index = self.vocabulary.get(word)
            if index is not None:
                out[index] += count
        out *= self.idf
        norm = np.linalg.norm(out)
        return out / norm if norm > 0 else out

    def similarity(self, a: str, b: str) -> float:
        return float(self.vector(a) @ self.vector(b))


def consistency(tfidf: TfIdf, generations: Sequence[str], references: Sequence[str]) -> float:
    """RS of one case: tf-idf cosine of its generations against the reference texts."""
    if not generations or not references:
        return math.nan
    return tfidf.similarity(" ".join(generations), " ".join(references))
