"""Every Redis key prefix stratamesh writes, in one place."""

from __future__ import annotations

from typing import Final

__all__ = ["IDEMPOTENCY", "PSEUDONYMS"]

# strata:idem:<consumer group>:<event id> → "1", with the idempotency TTL.
IDEMPOTENCY: Final = "strata:idem:"

# strata:pii:<tenant>:<pseudonym> → the original value, with GuardSettings.pseudonym_ttl_s.
# Written and read only by stratamesh.security.pseudonym (re-identification goes through it).
PSEUDONYMS: Final = "strata:pii:"
