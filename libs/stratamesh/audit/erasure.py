"""Erasing a data subject: removing the mappings that turn their pseudonyms back into values.

Who is a "user" here.  The mesh has no accounts: it knows tenants (from keys) and the
*people mentioned in what they send* — names, e-mail addresses, phone numbers … that guard's
input stage detects and replaces by pseudonyms (``<PERSON_7f3a2c91d0>``,
:mod:`stratamesh.security.pseudonym`) before any model or log sees them.  A data subject is
therefore identified, within one tenant, by their values (``PERSON="Jane Doe"``,
``EMAIL_ADDRESS=jane@example.com``) or directly by pseudonyms.

What erasure does.  It deletes the pseudonym → value mappings from the operational Redis
(``strata:pii:<tenant>:<pseudonym>``): from then on no tool, reviewer or re-identification
can turn those pseudonyms back into the person.  Events on the topics and answers only ever
held the pseudonyms.  The audit trail never held values or pseudonyms at all (only counts
and hashes), so nothing in it changes and every chain still verifies; the erasure itself is
appended as a record of its own (chain ``audit.erasures/0``: tenant, how many mappings,
SHA-256 of each pseudonym — provable later, meaningless without the value).

What it does not do.  Pseudonyms are keyed hashes (HMAC with guard's secret): whoever
holds both the secret and the person's value can still recompute the same pseudonym and
link new requests about them.  Rotating guard's secret (``STRATA_GUARD__SECRET``) ends that
for all future data.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

from stratamesh.audit.chain import Entry
from stratamesh.audit.store import AuditStore, chain_name, now_ms
from stratamesh.config import Settings
from stratamesh.errors import ConfigError
from stratamesh.security.pseudonym import (
    PSEUDONYM_PATTERN,
    MemoryMappingStore,
    Pseudonymiser,
    RedisMappingStore,
    derive_key,
    load_guard_secret,
)
from stratamesh.stores.redis import open_redis

__all__ = [
    "ERASURES_TOPIC",
    "ERASURE_EVENT",
    "Erasure",
    "erase",
    "guard_secret",
    "pseudonyms_of",
]

# The pseudo-topic of erasure records in the audit trail (no Kafka topic of that name).
ERASURES_TOPIC: Final = "audit.erasures"
ERASURE_EVENT: Final = "PseudonymsErased"


def guard_secret(settings: Settings) -> bytes:
    """Guard's secret, read-only (never created here: a new one would match nothing)."""
    try:
        return load_guard_secret(settings, create=False)
    except ConfigError as exc:
        raise ConfigError(f"{exc}; or pass the pseudonyms with --pseudonym") from None


@dataclass(frozen=True, slots=True)
class Erasure:
    tenant: str
    pseudonyms: list[str]
    removed: int  # mappings that existed and were deleted
    record_chain: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "tenant": self.tenant,
            "pseudonyms": self.pseudonyms,
            "mappings_removed": self.removed,
            "audit_chain": self.record_chain,
        }


def pseudonyms_of(secret: bytes, tenant: str, values: Sequence[tuple[str, str]]) -> list[str]:
    """The pseudonyms guard gives these ``(kind, value)`` pairs in ``tenant``."""
    p = Pseudonymiser(derive_key(secret, "pseudonym"), MemoryMappingStore())
    return [p.pseudonym(tenant, kind, value) for kind, value in values]


async def erase(
    settings: Settings,
    store: AuditStore,
    tenant: str,
    *,
    values: Sequence[tuple[str, str]] = (),
    pseudonyms: Sequence[str] = (),
) -> Erasure:
    """Delete the mappings of the subject's pseudonyms and append the erasure record."""
    if not tenant:
        raise ConfigError("erasure is per tenant: give --tenant")
    bad = [p for p in pseudonyms if not PSEUDONYM_PATTERN.fullmatch(p)]
    if bad:
        raise ConfigError(f"not a pseudonym: {bad[0]!r} (expected e.g. <PERSON_7f3a2c91d0>)")
    tokens = list(pseudonyms)
    if values:
        tokens += pseudonyms_of(guard_secret(settings), tenant, values)
    tokens = list(dict.fromkeys(tokens))
    if not tokens:
        raise ConfigError("nothing to erase: give --value KIND=VALUE or --pseudonym")
    redis = open_redis(settings)
    try:
        removed = int(await redis.delete(*[RedisMappingStore.key(tenant, t) for t in tokens]))
    finally:
        await redis.aclose()
    now = now_ms()
    kinds = sorted({m.group(1) for t in tokens if (m := PSEUDONYM_PATTERN.fullmatch(t))})
    detail = {
        "pseudonyms": len(tokens),
        "mappings_removed": removed,
        "kinds": kinds,
        "pseudonym_sha256": [hashlib.sha256(t.encode()).hexdigest() for t in tokens],
    }
    entry = Entry(
        topic=ERASURES_TOPIC,
        kafka_partition=0,
        kafka_offset=0,
        dedupe=str(uuid.uuid4()),
        event_type=ERASURE_EVENT,
        tenant=tenant,
        producer=store.signer.identity if store.signer else "",
        occurred_ms=now,
        recorded_ms=now,
        detail=json.dumps(detail, sort_keys=True, separators=(",", ":")),
    ).cleaned()
    chain = chain_name(ERASURES_TOPIC, 0)
    await store.append(chain, [entry])
    return Erasure(tenant, tokens, removed, chain)
