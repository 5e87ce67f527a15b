"""Consistent pseudonymisation: same value → same pseudonym per tenant, keyed, reversible only
through the tenant's mapping (in memory here; in the embedded Redis in the last test)."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from stratamesh.config import Settings
from stratamesh.security.pseudonym import (
    PSEUDONYM_PATTERN,
    MemoryMappingStore,
    Pseudonymiser,
    RedisMappingStore,
    Span,
    canonical,
)
from stratamesh.stores.keys import PSEUDONYMS
from stratamesh.stores.redis import open_redis

KEY = b"0123456789abcdef0123456789abcdef"


def spans_of(text: str, *values: tuple[str, str]) -> list[Span]:
    out = []
    for kind, value in values:
        start = text.index(value)
        out.append(Span(kind, start, start + len(value)))
    return out


def test_same_value_same_pseudonym_per_tenant_and_key() -> None:
    p = Pseudonymiser(KEY, MemoryMappingStore())
    a = p.pseudonym("acme", "PERSON", "Jane Roe")
    assert a == p.pseudonym("acme", "PERSON", "  jane   ROE ")
    assert PSEUDONYM_PATTERN.fullmatch(a) and a.startswith("<PERSON_")
    assert a != p.pseudonym("globex", "PERSON", "Jane Roe")  # unlinkable across tenants
    assert a != p.pseudonym("acme", "PERSON", "John Roe")
    assert a != Pseudonymiser(b"another key, 32 bytes long......", MemoryMappingStore()).pseudonym(
        "acme", "PERSON", "Jane Roe"
    )
    phone = p.pseudonym("acme", "PHONE_NUMBER", "+1 (415) 555-0132")
    assert phone == p.pseudonym("acme", "PHONE_NUMBER", "14155550132")
    assert canonical("IBAN_CODE", "gb82 west 1234") == "GB82WEST1234"


def test_replace_resolves_overlaps_and_keeps_the_rest_of_the_text() -> None:
    p = Pseudonymiser(KEY, MemoryMappingStore())
    text = "Call Jane Roe at 415-555-0132 or Jane Roe again."
    spans = [
        *spans_of(text, ("PERSON", "Jane Roe"), ("PHONE_NUMBER", "415-555-0132")),
        Span("PERSON", 5, 9, 0.6),  # "Jane": inside the longer span, dropped
        Span("PERSON", text.rindex("Jane Roe"), text.rindex("Jane Roe") + 8),
    ]
    out = p.replace("acme", text, spans)
    person = p.pseudonym("acme", "PERSON", "Jane Roe")
    phone = p.pseudonym("acme", "PHONE_NUMBER", "415-555-0132")
    assert out.text == f"Call {person} at {phone} or {person} again."
    assert out.count == 3 and out.categories == {"PERSON": 2, "PHONE_NUMBER": 1}
    assert "Jane" not in repr(out)  # the mapping never shows in a repr (or a log line)


async def test_reidentify_is_tenant_scoped() -> None:
    store = MemoryMappingStore()
    p = Pseudonymiser(KEY, store)
    text = "Mail jane@example.org"
    [done] = await p.pseudonymise(
        "acme", [text], [spans_of(text, ("EMAIL_ADDRESS", "jane@example.org"))]
    )
    assert "jane@" not in done.text
    assert await p.reidentify("acme", done.text) == (text, 1)
    # Another tenant holding the same pseudonym text learns nothing.
    assert await p.reidentify("globex", done.text) == (done.text, 0)
    assert await p.reidentify("acme", "no pseudonyms <PERSON_0000000000>") == (
        "no pseudonyms <PERSON_0000000000>",
        0,
    )


def test_short_keys_are_refused() -> None:
    with pytest.raises(ValueError):
        Pseudonymiser(b"short", MemoryMappingStore())


async def test_mapping_lives_in_redis_with_a_ttl(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path, redis_url=os.environ.get("STRATA_REDIS_URL"))
    redis = open_redis(settings)
    store = RedisMappingStore(redis)
    tenant = f"t-{uuid.uuid4().hex[:10]}"  # CI's Redis keeps state across runs
    p = Pseudonymiser(KEY, store, ttl_s=600)
    text = "SSN 123-45-6789"
    try:
        [done] = await p.pseudonymise(tenant, [text], [spans_of(text, ("US_SSN", "123-45-6789"))])
        token = done.text.removeprefix("SSN ")
        key = f"{PSEUDONYMS}{tenant}:{token}"
        assert await redis.get(key) == b"123-45-6789"
        assert 0 < await redis.ttl(key) <= 600
        assert await p.reidentify(tenant, done.text) == (text, 1)
        await redis.delete(key)
    finally:
        await store.aclose()
