"""Consistent pseudonymisation of PII, and the only way back (DESIGN.md §7).

The same value of the same kind gets the same pseudonym within a tenant, on every request and
every replica: ``<PERSON_7f3a2c91d0>`` is ``HMAC-SHA256(key, tenant, kind, canonical value)``
truncated to 40 bits.  Consistency keeps answers usable (the model can tell two people apart
and refer back to them) without ever seeing a name; the key keeps pseudonyms unlinkable across
tenants and unguessable by dictionary (without the key, hashing candidate names gives nothing).

The pseudonym → original mapping lives in the operational store under
``stores.keys.PSEUDONYMS`` + ``<tenant>:<pseudonym>`` with a TTL, so re-identification is a
tenant-scoped lookup through :meth:`Pseudonymiser.reidentify` and nothing else.  Original
values are never logged, never put in metric labels and never returned by ``repr``.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Final, Protocol

import redis.asyncio as aioredis

from stratamesh.errors import ConfigError
from stratamesh.stores.keys import PSEUDONYMS

if TYPE_CHECKING:
    from stratamesh.config import Settings

__all__ = [
    "GUARD_SECRET_FILE",
    "PSEUDONYM_PATTERN",
    "MappingStore",
    "MemoryMappingStore",
    "Pseudonymised",
    "Pseudonymiser",
    "RedisMappingStore",
    "Span",
    "canonical",
    "derive_key",
    "load_guard_secret",
]

PSEUDONYM_PATTERN: Final = re.compile(r"<([A-Z][A-Z_]{0,30})_([0-9a-f]{10})>")
_DIGITS_ONLY: Final = frozenset({"CREDIT_CARD", "PHONE_NUMBER", "US_SSN"})
_ALNUM_UPPER: Final = frozenset({"IBAN_CODE", "US_DRIVER_LICENSE", "ZIP_CODE"})
_SPACE = re.compile(r"\s+")

# guard's generated secret (pseudonym and canary keys), beside the identities' keys.
GUARD_SECRET_FILE: Final = "guard.secret"


def load_guard_secret(settings: Settings, *, create: bool = True) -> bytes:
    """``STRATA_GUARD__SECRET``, else ``KEYS/guard.secret`` — created once (mode 0600) by
    guard; a reader that is not guard (``create=False``) gets a ConfigError saying where."""
    if settings.guard.secret is not None:
        return settings.guard.secret.get_secret_value().encode("utf-8")
    path = Path(settings.keys_dir) / GUARD_SECRET_FILE
    if not create:
        if not path.exists():
            raise ConfigError(
                f"no guard secret at {path}: run this where guard runs (same STRATA_HOME) or "
                "set STRATA_GUARD__SECRET to guard's secret"
            )
        return path.read_text("ascii").strip().encode("ascii")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_text("ascii").strip().encode("ascii")
    value = secrets.token_hex(32)
    with os.fdopen(fd, "w") as fh:
        fh.write(value + "\n")
    return value.encode("ascii")


def derive_key(secret: bytes, purpose: str) -> bytes:
    """A sub-key of ``secret`` for one purpose (pseudonyms, canaries …): keys never mix."""
    return hmac.new(secret, b"stratamesh/" + purpose.encode(), hashlib.sha256).digest()


def canonical(entity_type: str, value: str) -> str:
    """The form of ``value`` that decides its pseudonym: ``+1 (555) 010-2030`` and
    ``15550102030`` are one phone, ``Jane  DOE`` and ``jane doe`` one person."""
    v = unicodedata.normalize("NFKC", value).strip()
    if entity_type in _DIGITS_ONLY:
        return "".join(c for c in v if c.isdigit())
    if entity_type in _ALNUM_UPPER:
        return "".join(c for c in v if c.isalnum()).upper()
    return _SPACE.sub(" ", v).casefold()


@dataclass(frozen=True, slots=True)
class Span:
    """A detected entity: ``text[start:end]`` is of kind ``entity_type``."""

    entity_type: str
    start: int
    end: int
    score: float = 1.0


@dataclass(frozen=True, slots=True)
class Pseudonymised:
    text: str
    count: int  # entities replaced
    categories: dict[str, int]  # entity type → count (safe to log: no values)
    # pseudonym → original; kept out of repr so a stray log line cannot print it
    mapping: dict[str, str] = field(repr=False)


class MappingStore(Protocol):
    async def put(self, tenant: str, items: dict[str, str], ttl_s: int) -> None: ...
    async def get(self, tenant: str, pseudonyms: Sequence[str]) -> list[str | None]: ...


class RedisMappingStore:
    """The mapping in the operational Redis (``stores.redis.open_redis``)."""

    def __init__(self, redis: aioredis.Redis) -> None:
        self.redis = redis

    @staticmethod
    def key(tenant: str, pseudonym: str) -> str:
        return f"{PSEUDONYMS}{tenant}:{pseudonym}"

    async def put(self, tenant: str, items: dict[str, str], ttl_s: int) -> None:
        if not items:
            return
        pipe = self.redis.pipeline(transaction=False)
        for pseudonym, value in items.items():
            # Refresh the TTL on every use: a mapping in use does not expire under a reader.
            pipe.set(self.key(tenant, pseudonym), value.encode("utf-8"), ex=ttl_s)
        await pipe.execute()

    async def get(self, tenant: str, pseudonyms: Sequence[str]) -> list[str | None]:
        if not pseudonyms:
            return []
        raw = await self.redis.mget([self.key(tenant, p) for p in pseudonyms])
        return [r.decode("utf-8") if isinstance(r, bytes) else r for r in raw]

    async def aclose(self) -> None:
        await self.redis.aclose()


class MemoryMappingStore:
    """An in-process mapping (unit tests of the logic around the store; no TTL)."""

    def __init__(self) -> None:
        self.data: dict[tuple[str, str], str] = {}

    async def put(self, tenant: str, items: dict[str, str], ttl_s: int) -> None:
        for pseudonym, value in items.items():
            self.data[(tenant, pseudonym)] = value

    async def get(self, tenant: str, pseudonyms: Sequence[str]) -> list[str | None]:
        return [self.data.get((tenant, p)) for p in pseudonyms]


def _resolve(spans: Sequence[Span], length: int) -> list[Span]:
    """Non-overlapping spans in text order: the longer (then higher-scored) span wins."""
    ordered = sorted(
        (s for s in spans if 0 <= s.start < s.end <= length),
        key=lambda s: (-(s.end - s.start), -s.score, s.start),
    )
    taken: list[Span] = []
    for s in ordered:
        if all(s.end <= t.start or s.start >= t.end for t in taken):
            taken.append(s)
    return sorted(taken, key=lambda s: s.start)


class Pseudonymiser:
    """Replaces detected spans by keyed pseudonyms and records the way back."""

    def __init__(self, key: bytes, store: MappingStore, ttl_s: int = 30 * 24 * 3600) -> None:
        if len(key) < 16:
            raise ValueError("the pseudonym key must have at least 128 bits")
        self._key = key
        self.store = store
        self.ttl_s = ttl_s

    def __repr__(self) -> str:
        return f"Pseudonymiser(store={type(self.store).__name__}, ttl_s={self.ttl_s})"

    def pseudonym(self, tenant: str, entity_type: str, value: str) -> str:
        kind = re.sub(r"[^A-Z_]", "_", entity_type.upper()) or "PII"
        msg = "\x00".join((tenant, kind, canonical(kind, value))).encode("utf-8")
        digest = hmac.new(self._key, msg, hashlib.sha256).hexdigest()[:10]
        return f"<{kind}_{digest}>"

    def replace(self, tenant: str, text: str, spans: Sequence[Span]) -> Pseudonymised:
        """The pseudonymised text (pure: nothing stored; :meth:`pseudonymise` stores)."""
        out: list[str] = []
        pos = 0
        mapping: dict[str, str] = {}
        categories: dict[str, int] = {}
        chosen = _resolve(spans, len(text))
        for s in chosen:
            value = text[s.start : s.end]
            token = self.pseudonym(tenant, s.entity_type, value)
            mapping.setdefault(token, value)
            categories[s.entity_type] = categories.get(s.entity_type, 0) + 1
            out.append(text[pos : s.start])
            out.append(token)
            pos = s.end
        out.append(text[pos:])
        return Pseudonymised("".join(out), len(chosen), categories, mapping)

    async def pseudonymise(
        self, tenant: str, texts: Sequence[str], spans: Sequence[Sequence[Span]]
    ) -> list[Pseudonymised]:
        """Pseudonymise several texts of one tenant; one store round trip for all of them."""
        results = [self.replace(tenant, t, s) for t, s in zip(texts, spans, strict=True)]
        merged: dict[str, str] = {}
        for r in results:
            for token, value in r.mapping.items():
                merged.setdefault(token, value)
        await self.store.put(tenant, merged, self.ttl_s)
        return results

    async def reidentify(self, tenant: str, text: str) -> tuple[str, int]:
        """``text`` with this tenant's known pseudonyms replaced by their originals, and how
        many were replaced (unknown or expired pseudonyms stay as they are)."""
        tokens = list(dict.fromkeys(m.group(0) for m in PSEUDONYM_PATTERN.finditer(text)))
        if not tokens:
            return text, 0
        values = await self.store.get(tenant, tokens)
        known = {t: v for t, v in zip(tokens, values, strict=True) if v is not None}
        if not known:
            return text, 0
        count = 0

        def sub(m: re.Match[str]) -> str:
            nonlocal count
            value = known.get(m.group(0))
            if value is None:
                return m.group(0)
            count += 1
            return value

        return PSEUDONYM_PATTERN.sub(sub, text), count
