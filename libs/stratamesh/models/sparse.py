"""BM25-style sparse vectors, computed without corpus statistics.

BM25 scores a document ``d`` for a query ``q`` as::

    Σ_{t ∈ q ∩ d}  IDF(t) · tf(t,d)·(k1+1) / (tf(t,d) + k1·(1 − b + b·|d|/avgdl))

The right-hand factor depends on the document alone, so the embed service can compute it
per chunk (:func:`document_vector`); IDF depends on the whole collection and is applied by
the index (Qdrant sparse vectors with ``Modifier.IDF``), which keeps the vectors of a chunk
deterministic: the same text gives the same vector in every process, on every replay.
Query vectors (:func:`query_vector`) weigh each distinct term 1.0, so the dot product is
the BM25 sum above.

The one corpus statistic BM25 wants, the average document length, is a fixed constant
(:data:`AVGDL`) rather than a running mean: a mean would make a chunk's vector depend on
what was indexed before it, and change under replay.  150 is the mean length in kept terms
of SciFact's title + abstract documents (148) under this tokeniser; a wrong value only
shifts how strongly length is normalised (``b``): on SciFact's train queries, sparse-only
nDCG@10 was 0.678 / 0.688 / 0.689 / 0.688 with avgdl 64 / 128 / 150 / 256.

Stemming was measured on the same queries (avgdl 150, IDF as Qdrant computes it): no
stemming 0.669 (``bm25s`` without a stemmer: 0.667), plurals only 0.685, :func:`stem` 0.689.

Terms: lower-cased unicode words (letters and digits, underscores split), English stop
words removed, a light plural/inflection stemmer (:func:`stem`), then hashed to 31-bit
indices with BLAKE2b (stable across processes, unlike the salted builtin ``hash``).
Colliding terms share a dimension; with 2³¹ buckets that is rare and harmless for ranking.

:data:`SPARSE_MODEL` names this vectoriser and its version; it is stamped on every event
that carries sparse vectors.  Any change to the tokeniser, stop words, stemmer, hash or
parameters must bump it, since vectors of different versions are not comparable.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from typing import Final

__all__ = [
    "AVGDL",
    "K1",
    "SPARSE_MODEL",
    "STOPWORDS",
    "B",
    "SparseVec",
    "document_vector",
    "query_vector",
    "stem",
    "term_index",
    "terms",
    "tokenize",
]

SPARSE_MODEL: Final = "strata-bm25@1"
"""Id and version of this vectoriser (tokeniser, stop words, stemmer, hash, k1, b, avgdl)."""

K1: Final = 1.2
B: Final = 0.75
AVGDL: Final = 150.0
"""Fixed average document length in kept terms (see the module doc)."""

_MAX_TERM_CHARS: Final = 40
_INDEX_MASK: Final = 0x7FFF_FFFF  # 31 bits: fits Avro `int` and Qdrant's uint32 indices
_WORD: Final = re.compile(r"[^\W_]+")

_STOPWORD_TEXT: Final = """
    a about above after again against all also am an and any are as at be because been
    before being below between both but by can could did do does doing down during each
    either else ever few for from further had has have having he her here hers herself him
    himself his how however i if in into is it its itself just let me more most my myself
    neither no nor not of off on once only or other our ours ourselves out over own same
    she should so some such than that the their theirs them themselves then there these
    they this those through thus to too under until up upon us very via was we were what
    when where whether which while who whom whose why will with within without would yet
    you your yours yourself yourselves
"""
STOPWORDS: Final[frozenset[str]] = frozenset(_STOPWORD_TEXT.split())
"""English function words: frequent, carrying no topic (negations stay out: "no", "not"
are stop words as in most BM25 setups — the dense vector keeps the sentence's polarity)."""


@dataclass(frozen=True, slots=True)
class SparseVec:
    """Indices (sorted, distinct, 0 ≤ i < 2³¹) and their weights."""

    indices: list[int]
    values: list[float]

    def as_dict(self) -> dict[int, float]:
        return dict(zip(self.indices, self.values, strict=True))


def stem(word: str) -> str:
    """A light suffix stripper: plurals and the commonest inflections, nothing clever.

    ``studies → study``, ``cells → cell``, ``classes → class``, ``treated → treat``,
    ``binding → bind``; words of four letters or fewer and words ending in ``ss``/``us``/``is``
    (``mass``, ``virus``, ``analysis``) are left alone.  Deliberately weaker than Porter:
    aggressive stemming merges biomedical terms that mean different things.
    """
    n = len(word)
    if n <= 4 or not word.isalpha():
        return word
    if word.endswith("ies") and n > 5:
        return word[:-3] + "y"
    if word.endswith(("sses", "xes", "ches", "shes")):
        return word[:-2]
    if word.endswith("s") and not word.endswith(("ss", "us", "is", "ous")):
        return word[:-1]
    if word.endswith("ing") and n > 6:
        base = word[:-3]
        return base[:-1] if len(base) > 3 and base[-1] == base[-2] else base
    if word.endswith("ed") and n > 5 and not word.endswith("eed"):
        base = word[:-2]
        return base[:-1] if len(base) > 3 and base[-1] == base[-2] else base
    return word


def tokenize(text: str) -> list[str]:
    """Lower-cased words of ``text`` (letters and digits), before stop words and stemming."""
    return _WORD.findall(text.lower())


@lru_cache(maxsize=262_144)
def _term(token: str) -> str | None:
    if token in STOPWORDS or len(token) > _MAX_TERM_CHARS:
        return None
    if len(token) == 1 and not token.isdigit():
        return None
    return stem(token)


def terms(text: str) -> list[str]:
    """The kept terms of ``text``, in order, with repetitions."""
    out = []
    for token in tokenize(text):
        term = _term(token)
        if term is not None:
            out.append(term)
    return out


@lru_cache(maxsize=262_144)
def term_index(term: str) -> int:
    """The stable 31-bit index of ``term`` (BLAKE2b, the same in every process)."""
    digest = hashlib.blake2b(term.encode("utf-8"), digest_size=4).digest()
    return int.from_bytes(digest, "little") & _INDEX_MASK


def _counts(items: Iterable[str]) -> Counter[int]:
    return Counter(term_index(t) for t in items)


def document_vector(text: str, *, k1: float = K1, b: float = B, avgdl: float = AVGDL) -> SparseVec:
    """BM25 term-frequency saturation of each term of ``text``; IDF is the index's part."""
    kept = terms(text)
    if not kept:
        return SparseVec([], [])
    counts = _counts(kept)
    norm = k1 * (1.0 - b + b * len(kept) / avgdl)
    indices = sorted(counts)
    values = [counts[i] * (k1 + 1.0) / (counts[i] + norm) for i in indices]
    return SparseVec(indices, values)


def query_vector(text: str) -> SparseVec:
    """Weight 1.0 per distinct term of ``text`` (the index multiplies in IDF)."""
    indices = sorted(set(_counts(terms(text))))
    return SparseVec(indices, [1.0] * len(indices))
