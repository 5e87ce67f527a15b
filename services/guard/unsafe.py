"""Unsafe-content scanner for answers: weighted phrase rules (heuristic, stated as such).

Categories: operational instructions for weapons/explosives, self-harm encouragement or
methods, malware, and dehumanising hate.  ``score`` is the strongest rule that fired; the
output stage blocks at ``GuardSettings.unsafe_threshold`` and escalates to a human at the
tenant's ``escalate.unsafe_score``.  A trained classifier (e.g. on the Davidson toxicity set)
would widen coverage of hate speech; these rules target the instruction-like harms a QA
answer could carry.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

__all__ = ["UNSAFE_RULES", "UnsafeScore", "unsafe_score"]

_F = re.IGNORECASE
UNSAFE_RULES: Final[tuple[tuple[str, str, float, re.Pattern[str]], ...]] = (
    (
        "weapons",
        "explosive_instructions",
        0.95,
        re.compile(
            r"\b(?:how to|steps? to|instructions? (?:for|to)|recipe for)\b[\w\s,]{0,40}?"
            r"\b(?:make|build|assemble|synthesi[sz]e)\b[\w\s,]{0,30}?"
            r"\b(?:bomb|explosive|pipe bomb|napalm|nerve agent|sarin|ricin|molotov)\b",
            _F,
        ),
    ),
    (
        "weapons",
        "explosive_materials",
        0.6,
        re.compile(
            r"\b(?:ammonium nitrate|tatp|acetone peroxide|thermite)\b.{0,60}\b(?:mix|detonat|fuse)",
            _F,
        ),
    ),
    (
        "self_harm",
        "self_harm_encouragement",
        0.95,
        re.compile(
            r"\b(?:you should|go ahead and|just)\s+(?:kill yourself|end your life|hurt yourself)\b"
            r"|\b(?:best|easiest|painless) (?:way|method)s? to"
            r" (?:kill yourself|commit suicide|die)\b",
            _F,
        ),
    ),
    (
        "malware",
        "malware",
        0.8,
        re.compile(
            r"\b(?:ransomware|keylogger|credential stealer|botnet)\b.{0,80}\b(?:code|script|payload"
            r"|deploy|spread)\b",
            _F | re.DOTALL,
        ),
    ),
    (
        "hate",
        "dehumanising",
        0.9,
        re.compile(
            r"\b(?:all|those)\s+\w+s?\s+(?:are|should be)\s+(?:vermin|animals|subhuman|exterminated"
            r"|eradicated|wiped out)\b",
            _F,
        ),
    ),
)


@dataclass(frozen=True, slots=True)
class UnsafeScore:
    score: float
    categories: tuple[str, ...]
    rules: tuple[str, ...]


def unsafe_score(text: str) -> UnsafeScore:
    hits = [(cat, name, w) for cat, name, w, rx in UNSAFE_RULES if rx.search(text)]
    if not hits:
        return UnsafeScore(0.0, (), ())
    return UnsafeScore(
        max(w for _, _, w in hits),
        tuple(dict.fromkeys(c for c, _, _ in hits)),
        tuple(n for _, n, _ in hits),
    )
