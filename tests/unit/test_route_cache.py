"""Route's response cache on a real Redis (STRATA_REDIS_URL, else the embedded server):
keying, exact and semantic hits, tenant scope, fill from results, invalidation."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
import redis.asyncio as aioredis

from stratamesh.config import Settings
from stratamesh.events import (
    Citation,
    CompletionStatus,
    Message,
    Query,
    RequestCompleted,
    Role,
)
from stratamesh.events.testing import sample_event
from stratamesh.services.route.cache import (
    ResponseCache,
    exact_digest,
    normalise,
    semantic_scope,
)
from stratamesh.stores.keys import ROUTE_PENDING
from stratamesh.stores.redis import open_redis

DIM = 8


@pytest.fixture
async def redis(tmp_path: Path) -> AsyncIterator[aioredis.Redis]:
    r = open_redis(Settings(home=tmp_path, redis_url=os.environ.get("STRATA_REDIS_URL")))
    yield r
    await r.aclose()


@pytest.fixture
def cache(redis: aioredis.Redis) -> ResponseCache:
    return ResponseCache(redis, ttl_s=60, threshold=0.92, max_entries=50)


def tenant() -> str:
    return f"t-{uuid.uuid4().hex[:12]}"


def vec(*components: float) -> np.ndarray:  # type: ignore[type-arg]
    v = np.zeros(DIM, dtype=np.float32)
    v[: len(components)] = components
    return v / np.linalg.norm(v)


def cite(doc_id: str, version: int) -> Citation:
    return Citation(doc_id=doc_id, doc_version=version, chunk_id=f"{doc_id}:{version}:0", text="t")


def result(request_id: str, tenant_: str, *cites: Citation, **kw: object) -> RequestCompleted:
    fields: dict[str, object] = {
        "tenant": tenant_,
        "request_id": request_id,
        "status": CompletionStatus.OK,
        "answer": f"answer of {request_id}",
        "citations": list(cites),
        "model": "m@1",
    }
    fields.update(kw)
    return sample_event(RequestCompleted, **fields)


async def cached(
    cache: ResponseCache,
    t: str,
    rid: str,
    q: Query,
    v: np.ndarray,
    *cites: Citation,  # type: ignore[type-arg]
) -> str:
    digest = exact_digest(q.prompt, q)
    await cache.remember(t, rid, digest, semantic_scope(q), v)
    assert await cache.fill(t, result(rid, t, *cites))
    return digest


def test_keys_ignore_form_but_not_meaning() -> None:
    q = Query(prompt="x")
    assert normalise("  What is  <PERSON_1>'s Plan?? ") == "what is <person_1>'s plan"
    base = exact_digest("What is the refund policy?", q)
    assert exact_digest("what is the   refund policy", q) == base
    assert exact_digest("What is the refund policy for PRO?", q) != base
    for other in (
        Query(prompt="x", task="summarise"),
        Query(prompt="x", response_format='{"type": "object"}'),
        Query(prompt="x", principals=["group:hr"]),
        Query(prompt="x", messages=[Message(role=Role.USER, content="earlier")]),
    ):
        assert exact_digest("What is the refund policy?", other) != base
    assert semantic_scope(Query(prompt="x", principals=["a", "b"])) == semantic_scope(
        Query(prompt="x", principals=["b", "a"])
    )
    assert (
        semantic_scope(Query(prompt="x", messages=[Message(role=Role.USER, content="e")])) is None
    )


async def test_exact_and_semantic_hits_stay_in_their_tenant(cache: ResponseCache) -> None:
    t, other = tenant(), tenant()
    q = Query(prompt="How do I reset my password?")
    digest = await cached(cache, t, "r1", q, vec(1, 0), cite("faq", 1))
    hit = await cache.get_exact(t, digest)
    assert hit is not None and hit.kind == "exact" and hit.entry.answer == "answer of r1"
    assert hit.entry.citations[0].doc_id == "faq" and hit.entry.source_request_id == "r1"
    scope = semantic_scope(q)
    assert scope is not None
    near = await cache.get_semantic(t, scope, vec(1, 0.2))  # cosine 0.98
    assert near is not None and near.kind == "semantic" and 0.97 < near.similarity < 0.99
    assert await cache.get_semantic(t, scope, vec(1, 0.5)) is None  # cosine 0.89 < 0.92
    assert await cache.get_exact(other, digest) is None
    assert await cache.get_semantic(other, scope, vec(1, 0)) is None
    acl = semantic_scope(Query(prompt="x", principals=["group:hr"]))
    assert acl is not None and await cache.get_semantic(t, acl, vec(1, 0)) is None


async def test_only_routed_requests_are_filled_once(cache: ResponseCache) -> None:
    t = tenant()
    assert not await cache.fill(t, result("never-routed", t))
    q = Query(prompt="q")
    await cache.remember(t, "r1", exact_digest("q", q), semantic_scope(q), vec(1))
    assert not await cache.fill(tenant(), result("r1", t))  # another tenant's result
    assert await cache.fill(t, result("r1", t))
    assert not await cache.fill(t, result("r1", t))  # the pending note is used up


async def test_new_document_version_invalidates_what_cited_the_old(cache: ResponseCache) -> None:
    t = tenant()
    q_old, q_new, q_other = (Query(prompt=p) for p in ("old policy", "new policy", "other"))
    d_old = await cached(cache, t, "r1", q_old, vec(1, 0), cite("policy", 1), cite("misc", 4))
    d_new = await cached(cache, t, "r2", q_new, vec(0, 1), cite("policy", 2))
    d_other = await cached(cache, t, "r3", q_other, vec(0, 0, 1), cite("misc", 4))
    scope = semantic_scope(q_old)
    assert scope is not None
    assert await cache.get_semantic(t, scope, vec(1, 0)) is not None  # loads the mirror

    assert await cache.invalidate(t, "policy", 2) == 1
    assert await cache.get_exact(t, d_old) is None
    assert await cache.get_semantic(t, scope, vec(1, 0)) is None  # mirror reloaded
    assert await cache.get_exact(t, d_new) is not None  # cites v2: still current
    assert await cache.get_exact(t, d_other) is not None
    assert await cache.invalidate(t, "policy", 2) == 0  # idempotent
    assert await cache.invalidate(tenant(), "misc", 9) == 0  # other tenant's doc

    # An answer computed from v1 that arrives after v2 was indexed is never cached.
    await cache.remember(t, "late", exact_digest("late", q_old), scope, vec(1, 0))
    assert not await cache.fill(t, result("late", t, cite("policy", 1)))
    assert await cache.get_exact(t, exact_digest("late", q_old)) is None


async def test_replicas_see_each_others_changes(redis: aioredis.Redis) -> None:
    a = ResponseCache(redis, ttl_s=60, threshold=0.9, max_entries=50)
    b = ResponseCache(redis, ttl_s=60, threshold=0.9, max_entries=50)
    t = tenant()
    q = Query(prompt="shared")
    scope = semantic_scope(q)
    assert scope is not None
    assert await b.get_semantic(t, scope, vec(1)) is None  # b's mirror: empty
    await cached(a, t, "r1", q, vec(1), cite("d", 1))
    assert await b.get_semantic(t, scope, vec(1)) is not None  # b reloads on change
    await a.invalidate(t, "d", 2)
    assert await b.get_semantic(t, scope, vec(1)) is None


async def test_semantic_entries_are_bounded(redis: aioredis.Redis) -> None:
    cache = ResponseCache(redis, ttl_s=60, threshold=0.99, max_entries=3)
    t = tenant()
    for i in range(6):
        q = Query(prompt=f"question {i}")
        await cached(cache, t, f"r{i}", q, vec(*([0.0] * i + [1.0])))
    scope = semantic_scope(Query(prompt="x"))
    assert scope is not None
    assert await redis.hlen(cache.semantic_key(t, scope)) == 3


async def test_pending_note_lives_until_shortly_after_the_deadline(
    cache: ResponseCache, redis: aioredis.Redis
) -> None:
    t = tenant()
    q = Query(prompt="q")
    soon = time.time_ns() // 1_000_000 + 2_000
    await cache.remember(t, "r1", exact_digest("q", q), semantic_scope(q), vec(1), deadline_ms=soon)
    await cache.remember(t, "r2", exact_digest("q", q), semantic_scope(q), vec(1))
    short = await redis.pttl(f"{ROUTE_PENDING}{t}:r1")
    default = await redis.pttl(f"{ROUTE_PENDING}{t}:r2")
    assert 25_000 < short <= 32_000 and 295_000 < default <= 300_000
