"""An answer cut into claims: its sentences, each with the passage numbers it cites.

Citation forms are infer's (``[2]``, ``[1, 3]``, ``[2-4]``; services/infer/prompting.py).
Sentences that assert nothing checkable — questions, abstentions ("I do not know"), bare
headings — are not claims: an answer may say it has no answer without being unfaithful.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from stratamesh.citations import cited_numbers, strip_markers
from stratamesh.models.grounding import content_words, sentences

__all__ = ["Claim", "split_claims"]

_ABSTAIN = re.compile(
    r"\b(i do not know|i don't know|cannot (?:be )?(?:answer|determine|find)|"
    r"no (?:information|sources?)|(?:passages|context) do(?:es)? not (?:say|contain|mention))\b",
    re.IGNORECASE,
)
_MIN_CONTENT_WORDS: Final = 2


@dataclass(frozen=True, slots=True)
class Claim:
    text: str  # the sentence without its markers
    cited: tuple[int, ...]  # passage numbers it cites, in order


def split_claims(answer: str) -> list[Claim]:
    claims: list[Claim] = []
    for sentence in sentences(answer):
        numbers = tuple(dict.fromkeys(cited_numbers(sentence)))
        text = strip_markers(sentence)
        if text.endswith("?") or _ABSTAIN.search(text):
            continue
        if len(content_words(text)) < _MIN_CONTENT_WORDS:
            continue
        claims.append(Claim(text, numbers))
    return claims
