"""The one citation-marker parser infer, judge and guard share."""

from __future__ import annotations

import pytest

from stratamesh.citations import cited_numbers, marker_numbers, marker_parts, strip_markers


@pytest.mark.parametrize(
    ("text", "numbers"),
    [
        ("Paris [1] and [1; 3] and [2–4].", [1, 1, 3, 2, 3, 4]),
        ("In [2024] it rained [ 2 ].", [2]),  # a bracketed year is not a citation
        ("All of them [1-2000].", [1]),  # an absurd range keeps its first number
        ("Backwards [4-2].", [4]),
        ("Nothing [a] cited.", []),
    ],
)
def test_cited_numbers(text: str, numbers: list[int]) -> None:
    assert cited_numbers(text) == numbers


def test_parts_numbers_and_stripping() -> None:
    assert marker_parts(" 1, 3-4 ;5") == ["1", "3-4", "5"]
    assert marker_numbers("1, 3-4") == [1, 3, 4]
    stripped = strip_markers("Refunds take 14 days [1, 2]. Really [3]")
    assert stripped == "Refunds take 14 days. Really"
