"""Citation markers in answers — ``[2]``, ``[1, 3]``, ``[2-4]`` — read one way everywhere.

infer writes them (and attributes post-hoc ones), judge checks each claim against the
passages it cites, guard verifies and renumbers them before release: all three use this
parser, so they never disagree about what an answer cites.
"""

from __future__ import annotations

import re
from typing import Final

__all__ = ["MARKER", "cited_numbers", "marker_numbers", "marker_parts", "strip_markers"]

MARKER: Final = re.compile(r"\[(\s*\d{1,3}(?:\s*[-–,;]\s*\d+)*\s*)\]")
"""One marker; group 1 is its body (``1, 3``, ``2-4``).  A bracketed year (``[2024]``) is not
one: a marker starts with a passage number of at most three digits."""

_MAX_RANGE: Final = 20  # "[1-2000]" is not a citation of 2000 passages: its first number only
_WITH_SPACE: Final = re.compile(r"\s*" + MARKER.pattern)


def marker_parts(body: str) -> list[str]:
    """A marker body's comma- or semicolon-separated parts: ``"1, 3-4"`` → ``["1", "3-4"]``."""
    return [p for p in re.split(r"\s*[,;]\s*", body.strip()) if p]


def marker_numbers(body: str) -> list[int]:
    """The passage numbers of a marker body (or of one part of it), in order."""
    out: list[int] = []
    for part in marker_parts(body):
        bounds = [int(x) for x in re.split(r"\s*[-–]\s*", part)]
        low, high = bounds[0], bounds[-1]
        out += [low] if high - low > _MAX_RANGE or high < low else list(range(low, high + 1))
    return out


def cited_numbers(text: str) -> list[int]:
    """Every passage number ``text`` cites, in order, repeats kept."""
    return [n for m in MARKER.finditer(text) for n in marker_numbers(m.group(1))]


def strip_markers(text: str) -> str:
    """``text`` without its markers (nor the space before each)."""
    return _WITH_SPACE.sub("", text).strip()
