"""Generation metrics: fluency GE (n-gram entropy) and consistency RS (tf-idf similarity).

Both follow ROME's code (`experiments/py/eval_utils_counterfact.py`, `dsets/tfidf_stats.py`):

GE (Meng et al. 2022, after Zhang et al. 2018): for a text, the entropy in bits of its bigram and
trigram frequency distributions over nltk's `word_tokenize` tokens (case kept), weighted 2/3 and
4/3 and averaged; a case's GE is the mean over its generations. Repetitive text (a common failure
of over-strong edits) scores low. nltk's English sentence model (`punkt_tab`, `python -m
nltk.downloader punkt_tab`) is used when installed; without it the sentences are split by nltk's
untrained Punkt tokenizer, which differs only around abbreviations ("Mr. Smith").
`tokenizer_name()` says which.

RS: the cosine similarity of tf-idf vectors between the case's generations (joined by spaces) and
reference text about the new target (Wikipedia snippets in ROME's `attribute_snippets.json`),
with scikit-learn's `TfidfVectorizer` analysis as ROME configures it: lower-cased words of two or
more word characters, raw counts times ROME's `idf.npy` over `tfidf_vocab.json`, L2-normalised.
Where ROME would divide by a zero norm (no known word) and get NaN, RS here is 0.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

TFIDF_WORD = re.compile(r"(?u)\b\w\w+\b")  # scikit-learn's default token_pattern
_tokenize = None
_tokenizer_name = ""


def word_tokens(text: str) -> list[str]:
    """nltk's `word_tokenize(text)`: sentences, then the Treebank-style word tokenizer."""
    global _tokenize, _tokenizer_name
    if _tokenize is None:
        import nltk  # here: the algorithms import without it
        from nltk.tokenize import NLTKWordTokenizer
        from nltk.tokenize.punkt import PunktSentenceTokenizer

        try:
            nltk.data.find("tokenizers/punkt_tab/english/")
            _tokenize = nltk.word_tokenize
            _tokenizer_name = "nltk.word_tokenize (punkt_tab english)"
        except LookupError:
            sentences, treebank = PunktSentenceTokenizer(), NLTKWordTokenizer()

            def _tokenize(text: str) -> list[str]:
                return [w for s in sentences.tokenize(text) for w in treebank.tokenize(s)]

            _tokenizer_name = "nltk NLTKWordTokenizer over untrained Punkt sentences (no punkt_tab)"
    return _tokenize(text)


def tokenizer_name() -> str:
    """Which word tokenizer GE uses here (see the module's docstring)."""
    word_tokens("")
    return _tokenizer_name


def tfidf_words(text: str) -> list[str]:
    """The words a tf-idf vector counts: lower-cased runs of two or more word characters."""
    return TFIDF_WORD.findall(text.lower())


def ngram_entropy(
    text: str, orders: Sequence[int] = (2, 3), weights: Sequence[float] = (2 / 3, 4 / 3)
) -> float:
    """The weighted mean over `orders` of the entropy (bits) of the text's n-gram distribution."""
    tokens = word_tokens(text)
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
        """Smoothed idf, log((1 + N) / (1 + df)) + 1, over the documents' words (as sklearn)."""
        frequency: Counter[str] = Counter()
        n_documents = 0
        for document in documents:
            n_documents += 1
            frequency.update(set(tfidf_words(document)))
        vocabulary = sorted(w for w, c in frequency.items() if c >= min_count)
        idf = np.array([math.log((1 + n_documents) / (1 + frequency[w])) + 1 for w in vocabulary])
        return cls({w: i for i, w in enumerate(vocabulary)}, idf)

    def vector(self, text: str) -> np.ndarray:
        """The L2-normalised tf-idf vector of a text (zero if none of its words is known)."""
        out = np.zeros(len(self.vocabulary))
        for word, count in Counter(tfidf_words(text)).items():
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
