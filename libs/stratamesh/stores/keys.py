"""Every Redis key prefix stratamesh writes, in one place."""

from __future__ import annotations

from typing import Final

__all__ = ["IDEMPOTENCY"]

# strata:idem:<consumer group>:<event id> → "1", with the idempotency TTL.
IDEMPOTENCY: Final = "strata:idem:"
