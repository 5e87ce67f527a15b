"""Is a claim supported by a context?  A small measured check on top of MiniLM embeddings.

No NLI or cross-encoder model ships in any installable wheel here (PLATFORM.md), so the
judge's faithfulness check is built from what is on the machine and measured on SciFact
(``benchmarks/judge.py``):

* the context is cut into *windows* — single sentences and pairs of adjacent sentences (a
  claim often joins two; MiniLM reads at most 256 word pieces, a window is well under);
* per claim, six features against those windows (:data:`FEATURES`): the best cosine
  similarity of MiniLM embeddings, how much of the claim's content words the best window and
  the whole context hold, numbers of the claim absent from the context, and two
  contradiction cues between the claim and its best window — a negation on one side only,
  and opposite directions of change ("increases" against "reduces");
* a logistic regression over them (:class:`GroundingModel`, weights in
  ``artifacts/grounding-v<N>.json``, trained by :mod:`stratamesh.models.train_grounding` on
  the train split of SciFact claims only) gives the probability that the claim is supported;
  at or above the artifact's threshold it is — unless its best window is on topic and speaks
  of change in the opposite direction: such a claim is *contradicted* whatever the
  probability (:func:`decide`).

Embedding similarity alone cannot tell "X raises Y" from "X lowers Y" (they embed close), and
the regression gives the cues little weight (on SciFact a negation word sits in many
supporting windows too).  The direction rule was kept because on the *train* split it costs
0.003 balanced accuracy (0.787 → 0.784) and doubles the contradictions caught (7 % → 15 %);
a negation rule cost 0.01–0.04 and was left out.  SciFact's contradictions are mostly subtle
(a changed population, dose or effect size): this check catches few of them — see the
artifact's ``metrics`` (``contradict``) before relying on it for those.

The functions here are pure (vectors in, numbers out) so that the service (async embedder),
the trainer and the benchmark (blocking embedder) share them exactly.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt

__all__ = [
    "ARTIFACT_VERSION",
    "FEATURES",
    "ClaimEvidence",
    "GroundingModel",
    "artifact_path",
    "content_words",
    "decide",
    "evidence",
    "features",
    "sentences",
    "windows",
]

ARTIFACT_VERSION: Final = 1
FEATURES: Final = (
    "max_cosine",
    "best_window_coverage",
    "context_coverage",
    "missing_numbers",
    "negation_mismatch",
    "direction_conflict",
)

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'(\[A-Z0-9])")
_WORD = re.compile(r"[A-Za-z0-9]+(?:[-'][A-Za-z0-9]+)*")
_NUMBER = re.compile(r"\d+(?:[.,]\d+)?")
_MAX_WINDOW_CHARS: Final = 600
_STOPWORD_TEXT: Final = (
    "a an and are as at be been being by can could did do does for from had has have how "
    "in into is it its may might of on or our so such than that the their them then there "
    "these they this those to was we were what when where which while who whom why will "
    "with would also both each more most other some only over under about after before "
    "between during through et al"
)
_STOPWORDS: Final = frozenset(_STOPWORD_TEXT.split())
_NEGATION_TEXT: Final = (
    "not no never none neither nor without cannot fail fails failed lack lacks lacking absent "
    "absence unable unrelated independent"
)
_NEGATIONS: Final = frozenset(_NEGATION_TEXT.split())
# Word stems of change, by direction.  A claim saying "increase" against a best window saying
# only "decrease" (or the reverse) is a contradiction cue.
_UP: Final = (
    "increas", "rais", "higher", "elevat", "enhanc", "promot", "augment", "improv", "more",
    "greater", "upregulat", "activat", "induc", "stimulat", "accelerat", "exceed", "gain",
    "positive", "benefi",
)  # fmt: skip
_DOWN: Final = (
    "decreas", "reduc", "lower", "diminish", "suppress", "inhibit", "less", "fewer",
    "downregulat", "attenuat", "impair", "declin", "prevent", "block", "slow", "loss",
    "negative", "harm", "worse",
)  # fmt: skip


def sentences(text: str) -> list[str]:
    """The sentences of ``text`` (whitespace normalised, empty ones dropped)."""
    flat = " ".join(text.split())
    return [s.strip() for s in _SENTENCE_END.split(flat) if s.strip()]


def windows(texts: Sequence[str]) -> list[tuple[int, str]]:
    """``(text index, window)`` for every sentence and pair of adjacent sentences of each
    text; a text of one sentence is one window."""
    out: list[tuple[int, str]] = []
    for i, text in enumerate(texts):
        sents = [s[:_MAX_WINDOW_CHARS] for s in sentences(text)]
        out += [(i, s) for s in sents]
        out += [(i, f"{a} {b}") for a, b in itertools.pairwise(sents)]
    return out


def _words(text: str) -> list[str]:
    return [w.lower() for w in _WORD.findall(text)]


def content_words(text: str) -> set[str]:
    """Lower-cased words of ``text`` that carry meaning (no stopwords, no 1-letter words)."""
    return {w for w in _words(text) if w not in _STOPWORDS and len(w) > 1}


def _stem_set(words: set[str]) -> set[str]:
    # Crude suffix folding so "reduces"/"reduced"/"reduction" meet; enough for coverage.
    return {w[:6] if len(w) > 6 else w for w in words}


def _coverage(claim: set[str], source: set[str]) -> float:
    if not claim:
        return 1.0
    return len(_stem_set(claim) & _stem_set(source)) / len(_stem_set(claim))


def _negated(text: str) -> int:
    words = _words(text)
    return sum(1 for w in words if w in _NEGATIONS or w.endswith("n't"))


def _direction(text: str) -> int:
    """+1 when ``text`` speaks of change upwards only, -1 downwards only, else 0."""
    words = _words(text)
    up = any(w.startswith(_UP) for w in words)
    down = any(w.startswith(_DOWN) for w in words)
    return (1 if up else 0) - (1 if down else 0)


def _numbers(text: str) -> set[str]:
    return {n.replace(",", "") for n in _NUMBER.findall(text)}


def features(
    claim: str,
    claim_vec: npt.NDArray[np.float32],
    context: Sequence[str],
    window_texts: Sequence[str],
    window_vecs: npt.NDArray[np.float32],
) -> tuple[list[float], int]:
    """The :data:`FEATURES` of ``claim`` against a context, and the index of its best window.

    ``window_vecs`` are the L2-normalised embeddings of ``window_texts`` (the windows of
    ``context``); with no windows every similarity is 0 and nothing is covered.
    """
    words = content_words(claim)
    all_words = set().union(*(content_words(t) for t in context)) if context else set()
    if len(window_texts) == 0:
        return [0.0, 0.0, _coverage(words, all_words), float(bool(_numbers(claim))), 0.0, 0.0], -1
    sims = window_vecs @ claim_vec
    best = int(np.argmax(sims))
    window = window_texts[best]
    missing = _numbers(claim) - set().union(*(_numbers(t) for t in context))
    negation = float((_negated(claim) > 0) != (_negated(window) > 0))
    d_claim, d_window = _direction(claim), _direction(window)
    conflict = float(d_claim != 0 and d_window not in (0, d_claim))
    return [
        float(sims[best]),
        _coverage(words, content_words(window)),
        _coverage(words, all_words),
        float(bool(missing)),
        negation,
        conflict,
    ], best


@dataclass(frozen=True, slots=True)
class GroundingModel:
    """Logistic regression over :data:`FEATURES`: P(claim supported)."""

    weights: tuple[float, ...]
    bias: float
    threshold: float
    version: str

    def probability(self, x: Sequence[float]) -> float:
        z = self.bias + sum(w * v for w, v in zip(self.weights, x, strict=True))
        return 1.0 / (1.0 + math.exp(-max(-50.0, min(50.0, z))))

    @classmethod
    def load(cls, path: Path | None = None) -> GroundingModel:
        meta: dict[str, Any] = json.loads((path or artifact_path()).read_text())
        if tuple(meta["features"]) != FEATURES:
            raise ValueError(f"grounding artifact features {meta['features']} != {FEATURES}")
        return cls(
            weights=tuple(float(w) for w in meta["weights"]),
            bias=float(meta["bias"]),
            threshold=float(meta["threshold"]),
            version=str(meta["version"]),
        )


ON_TOPIC_COSINE: Final = 0.5
ON_TOPIC_COVERAGE: Final = 0.5


def decide(model: GroundingModel, x: Sequence[float]) -> tuple[float, bool, bool]:
    """``(P(supported), supported, contradicted)`` of a claim's :data:`FEATURES` ``x``."""
    p = model.probability(x)
    on_topic = x[0] >= ON_TOPIC_COSINE and x[1] >= ON_TOPIC_COVERAGE
    flipped = on_topic and x[5] > 0
    supported = p >= model.threshold and not flipped
    # For the critique: an on-topic window that clashes (direction, negation, numbers).
    contradicted = flipped or (not supported and on_topic and (x[3] > 0 or x[4] > 0))
    return p, supported, contradicted


def artifact_path(version: int = ARTIFACT_VERSION) -> Path:
    return Path(str(resources.files("stratamesh.artifacts") / f"grounding-v{version}.json"))


@dataclass(frozen=True, slots=True)
class ClaimEvidence:
    """One claim judged against one context."""

    probability: float  # P(supported)
    supported: bool
    contradicted: bool  # supported-looking evidence with a negation/direction/number clash
    best_text: int  # index of the context text holding the best window (-1: none)
    best_window: str
    features: tuple[float, ...]


def evidence(
    model: GroundingModel,
    claim: str,
    claim_vec: npt.NDArray[np.float32],
    context: Sequence[str],
    window_index: Sequence[tuple[int, str]],
    window_vecs: npt.NDArray[np.float32],
) -> ClaimEvidence:
    """Whether ``context`` supports ``claim`` (``window_index`` = :func:`windows` of it)."""
    x, best = features(claim, claim_vec, context, [w for _, w in window_index], window_vecs)
    p, supported, contradicted = decide(model, x)
    return ClaimEvidence(
        probability=p,
        supported=supported,
        contradicted=contradicted,
        best_text=window_index[best][0] if best >= 0 else -1,
        best_window=window_index[best][1] if best >= 0 else "",
        features=tuple(x),
    )
