"""Prompt-injection and jailbreak scoring: named heuristics plus the trained classifier.

``score = max(classifier, strongest heuristic)``: a heuristic is a phrase family that on its
own is reason enough (e.g. "ignore all previous instructions"), with a weight below 1 where
benign text can use the same words.  The classifier
(:mod:`stratamesh.models.injection`, artifact version in every verdict) covers the long tail
of role-play and "developer mode" jailbreaks the rules do not name.  Which rules fired is kept
(names only) so a verdict explains itself.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from typing import Final

from stratamesh.models.injection import InjectionModel

__all__ = ["HEURISTICS", "InjectionScanner", "InjectionScore", "heuristic_hits"]

_F = re.IGNORECASE
HEURISTICS: Final[tuple[tuple[str, float, re.Pattern[str]], ...]] = (
    (
        "ignore_instructions",
        0.95,
        re.compile(
            r"\b(?:ignore|disregard|forget|override|bypass|skip)\b[\w\s,]{0,30}?\b(?:previous|prior|"
            r"above|earlier|preceding|all|any|your|the|system|original)\b[\w\s]{0,20}?\b"
            r"(?:instructions?|prompts?|rules|directives|guidelines|context|messages?)\b",
            _F,
        ),
    ),
    (
        "reveal_system_prompt",
        0.9,
        re.compile(
            r"\b(?:reveal|print|show|repeat|output|leak|display|tell me|give me|what (?:is|are))\b"
            r"[\w\s]{0,25}?\b(?:system|hidden|secret|initial|original|internal)\s+"
            r"(?:prompt|instructions?|message|rules|marker|token)s?\b",
            _F,
        ),
    ),
    (
        "persona_jailbreak",
        0.9,
        re.compile(
            r"\b(?:DAN|do anything now|developer mode|jailbr(?:oken|eak)|god ?mode|STAN|DUDE|AIM|"
            r"unfiltered (?:ai|mode|assistant)|evil (?:ai|bot|assistant))\b",
            re.UNICODE,
        ),
    ),
    (
        "no_restrictions",
        0.85,
        re.compile(
            r"\b(?:without|no|free (?:of|from)|ignore|remove|disable|bypass)\s+(?:any\s+|all\s+)?"
            r"(?:ethical|moral|safety|content|openai|usage)?\s*(?:restrictions|filters?|guidelines|"
            r"limitations|censorship|policies|rules|boundaries|safeguards)\b",
            _F,
        ),
    ),
    (
        "role_override",
        0.7,
        # Narrow on purpose: "from now on" or "pretend you are" alone is everyday language
        # ("call me Frank from now on"); measured 7 false positives in 6,754 benign prompts.
        re.compile(
            r"\b(?:you are no longer (?:an? |bound|restricted|chatgpt|limited)"
            r"|from now on,? you (?:are|will|must|shall) (?:act|respond|answer|be|ignore|behave)"
            r"|stay in character|act as if you (?:have|had) no)\b",
            _F,
        ),
    ),
    (
        "chat_markup",
        0.9,
        re.compile(
            r"<\|im_start\|>|<\|im_end\|>|<\|system\|>|\[/?INST\]|<<SYS>>|^#{2,}\s*system\s*:?",
            re.IGNORECASE | re.MULTILINE,
        ),
    ),
    (
        "new_instructions",
        0.8,
        re.compile(r"\b(?:new|updated|real|actual)\s+(?:system\s+)?instructions?\s*:", _F),
    ),
)

# Zero-width and bidi controls are stripped before the rules run: they are how a phrase like
# "ig\u200bnore previous instructions" hides from a regex.
_INVISIBLE = re.compile("[\u200b-\u200f\u202a-\u202e\u2060-\u2064\ufeff]")


def _clean(text: str) -> str:
    return _INVISIBLE.sub("", unicodedata.normalize("NFKC", text))


def heuristic_hits(text: str) -> list[tuple[str, float]]:
    """The rules that fire on ``text``, with their weights."""
    cleaned = _clean(text)
    return [(name, weight) for name, weight, rx in HEURISTICS if rx.search(cleaned)]


@dataclass(frozen=True, slots=True)
class InjectionScore:
    score: float
    classifier: float
    rules: tuple[str, ...]


class InjectionScanner:
    def __init__(self, model: InjectionModel) -> None:
        self.model = model

    @property
    def version(self) -> str:
        return self.model.version

    def score(self, texts: list[str]) -> InjectionScore:
        """One score for a request: the worst of its prompt and user messages."""
        best = InjectionScore(0.0, 0.0, ())
        for text in texts:
            if not text.strip():
                continue
            hits = heuristic_hits(text)
            clf = self.model.score(text)
            s = max([clf, *(w for _, w in hits)])
            if s > best.score or (s == best.score and hits):
                best = InjectionScore(s, clf, tuple(name for name, _ in hits))
        return best
