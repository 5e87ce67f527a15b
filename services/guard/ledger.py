"""Which decision completed a review: the first one guard sees (see :mod:`.review`)."""

from __future__ import annotations

from typing import Final, Protocol

import redis.asyncio as aioredis

from stratamesh.stores.keys import GUARD_REVIEWED

__all__ = ["MemoryReviewLedger", "RedisReviewLedger", "ReviewLedger"]

_TTL_S: Final = 30 * 24 * 3600  # as long as reviews.pending keeps its records


class ReviewLedger(Protocol):
    async def first(self, tenant: str, review_id: str, decision_id: str) -> bool:
        """True for the first decision of a review (and for that same decision again)."""
        ...


class RedisReviewLedger:
    def __init__(self, redis: aioredis.Redis) -> None:
        self.redis = redis

    async def first(self, tenant: str, review_id: str, decision_id: str) -> bool:
        key = f"{GUARD_REVIEWED}{tenant}:{review_id}"
        if await self.redis.set(key, decision_id, nx=True, ex=_TTL_S):
            return True
        held = await self.redis.get(key)
        # A redelivered decision is still "the first": its result gets the same event id.
        return (held.decode() if isinstance(held, bytes) else held) == decision_id


class MemoryReviewLedger:
    """For unit tests that inject a memory pseudonym store."""

    def __init__(self) -> None:
        self._held: dict[tuple[str, str], str] = {}

    async def first(self, tenant: str, review_id: str, decision_id: str) -> bool:
        return self._held.setdefault((tenant, review_id), decision_id) == decision_id
