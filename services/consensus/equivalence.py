"""When two candidates give "the same answer".

**Structured answers** (the candidate has ``structured``, i.e. a response_format was asked):
equal iff their canonical JSON is equal — ``json.loads`` then ``json.dumps`` with sorted
keys, no whitespace, UTF-8 kept.  So key order and spacing do not matter; every value
does (``1`` and ``1.0`` differ, ``"1"`` and ``1`` differ).  Text that is not JSON compares
byte for byte.  A structured candidate never equals a free-text one.

**Free text**, in order:

1. normalise: NFKC, case-folded, citation markers ``[n]`` removed, ``n't`` → ``not``,
   punctuation dropped, whitespace collapsed; equal normalised texts are equivalent;
2. guards: the multiset of numbers and the parity of negation words (not, no, never, …)
   must be equal, else the texts differ whatever their embeddings say — this is where
   sentence embeddings are weakest ("built in 1889" vs "built in 1899" and "X is Y" vs
   "X is not Y" both score ≈ 0.9+ with MiniLM);
3. cosine similarity of the bundled MiniLM (all-MiniLM-L6-v2) embeddings of the texts
   (citation markers removed) ≥ ``settings.consensus.similarity_threshold`` (default 0.9).

Classes are formed greedily: a new candidate joins the first class (in arrival order)
whose *first* member it is equivalent to, else it founds a new class.  Similarity is not
transitive, so this keeps classes disjoint and the count well defined; the class a
candidate joined is stored with its ballot, so a restarted instance never re-clusters.

Limits: embeddings see meaning only approximately.  Paraphrases below the threshold split
the vote (→ escalation, the safe side); two wrong answers that are near-paraphrases of
the right one, with the same numbers and negation parity, can join its class (a Byzantine
replica can at most add itself to a class, never move an honest vote).  MiniLM reads the
first 256 word pieces only: answers that differ only after that look identical to step 3
(steps 1–2 still see the whole text).  Units, names and dates written as words are not
guarded.  Use structured outputs where exactness matters.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np

from stratamesh.models.embedders import Embedder, LocalEmbedder, Vectors

__all__ = ["AnswerKey", "Equivalence", "canonical_json", "key_of", "normalise"]

_CITATION: Final = re.compile(r"\[\s*\d+(?:\s*[,-]\s*\d+)*\s*\]")
_NUMBER: Final = re.compile(r"\d+(?:[.,]\d+)*")
_WORD: Final = re.compile(r"\w+")
_SPACE: Final = re.compile(r"\s+")
_NEGATIONS: Final = frozenset(
    {"not", "no", "never", "none", "nobody", "nothing", "neither", "nor", "cannot", "without"}
)
_CACHE_SIZE: Final = 4096


def canonical_json(text: str) -> str | None:
    """The canonical form of a JSON text; None when it is not JSON."""
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return None
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _clean(text: str) -> str:
    text = unicodedata.normalize("NFKC", text)
    return _SPACE.sub(" ", _CITATION.sub(" ", text)).strip()


def normalise(text: str) -> str:
    lowered = _clean(text).casefold().replace("n't", " not").replace("n’t", " not")
    return " ".join(_WORD.findall(lowered))


@dataclass(frozen=True, slots=True)
class AnswerKey:
    """What equivalence compares of one answer."""

    structured: str | None  # canonical JSON (or "raw:" + the text when it is not JSON)
    normalised: str
    clean: str  # citation markers removed: the text that is embedded
    numbers: tuple[str, ...]
    negated: bool

    def cheap_verdict(self, other: AnswerKey) -> bool | None:
        """Equivalent (True), not (False), or undecided without embeddings (None)."""
        if self.structured is not None or other.structured is not None:
            return self.structured == other.structured
        if self.normalised == other.normalised:
            return True
        if self.numbers != other.numbers or self.negated != other.negated:
            return False
        if not self.normalised or not other.normalised:
            return False
        return None


def key_of(answer: str, structured: str | None) -> AnswerKey:
    if structured is not None:
        canon = canonical_json(structured)
        return AnswerKey(canon if canon is not None else "raw:" + structured, "", "", (), False)
    clean = _clean(answer)
    norm = normalise(answer)
    # Thousands separators dropped, a trailing sentence dot is not part of a number.
    numbers = tuple(sorted(n.replace(",", "").rstrip(".") for n in _NUMBER.findall(clean)))
    negations = sum(1 for w in norm.split() if w in _NEGATIONS)
    return AnswerKey(None, norm, clean, numbers, negations % 2 == 1)


class Equivalence:
    """Assigns answers to classes; embeds only the pairs that normalisation and the guards
    leave undecided (a local model on its latency lane, ``LocalEmbedder.embed_latency``;
    a remote one through its client)."""

    def __init__(self, embedder: Callable[[], Embedder], threshold: float) -> None:
        self._embedder_factory = embedder
        self._embedder: Embedder | None = None
        self.threshold = threshold
        self._vectors: OrderedDict[str, Vectors] = OrderedDict()

    @property
    def embedder(self) -> Embedder:
        if self._embedder is None:
            self._embedder = self._embedder_factory()
        return self._embedder

    def describe(self) -> str:
        return f"canonical-json|normalised-text+minilm-cosine>={self.threshold:g}"

    async def _model(self, texts: Sequence[str]) -> Vectors:
        embedder = self.embedder
        if isinstance(embedder, LocalEmbedder):  # a text or two on a decision's path
            return await embedder.embed_latency(texts)
        return await embedder.embed(texts)

    async def warm(self) -> None:
        """Load the model (and start consensus's model thread) now."""
        await self._model(["warm up"])

    async def _embed(self, texts: Sequence[str]) -> dict[str, Vectors]:
        missing = [t for t in dict.fromkeys(texts) if t not in self._vectors]
        if missing:
            vectors = await self._model(missing)
            for text, vec in zip(missing, vectors, strict=True):
                self._vectors[text] = vec
                if len(self._vectors) > _CACHE_SIZE:
                    self._vectors.popitem(last=False)
        out = {}
        for t in texts:
            self._vectors.move_to_end(t)
            out[t] = self._vectors[t]
        return out

    async def assign(self, new: AnswerKey, classes: Sequence[tuple[int, AnswerKey]]) -> int | None:
        """The first class (``(id, first member's key)``, in order) ``new`` is equivalent
        to; None when it founds a class of its own.  Embeds only what that needs: the
        classes before the first one the cheap checks already match."""
        undecided: list[tuple[int, AnswerKey]] = []
        matched: int | None = None
        for klass, rep in classes:
            verdict = new.cheap_verdict(rep)
            if verdict is None:
                undecided.append((klass, rep))
            elif verdict:
                matched = klass  # later classes cannot come first
                break
        if undecided:  # all before `matched`, in order
            vectors = await self._embed([new.clean, *[rep.clean for _, rep in undecided]])
            mine = vectors[new.clean]
            for klass, rep in undecided:
                if float(np.dot(mine, vectors[rep.clean])) >= self.threshold:
                    return klass
        return matched

    async def similarity(self, a: str, b: str) -> float:
        """Cosine of the two texts' embeddings (for tests and tuning the threshold)."""
        vectors = await self._embed([_clean(a), _clean(b)])
        return float(np.dot(vectors[_clean(a)], vectors[_clean(b)]))
