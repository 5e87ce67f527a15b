"""The route service on the real broker, with real Redis (STRATA_REDIS_URL or the embedded
server) and the real classifier (packaged artifact over MiniLM): a cached answer skips to
guard_out, an over-budget tenant gets an explicit result, and a new document version
invalidates the answers that cited the old one."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import pytest

from stratamesh.bus import headers as H
from stratamesh.bus import topics as T
from stratamesh.bus.codec import Codec
from stratamesh.config import Settings
from stratamesh.events import (
    ChunksIndexed,
    Citation,
    CompletionStatus,
    Priority,
    Query,
    RequestAdmitted,
    RequestCompleted,
    RequestRouted,
)
from stratamesh.events.testing import sample_event
from stratamesh.services.route.app import build_service
from stratamesh.services.route.cache import exact_digest
from stratamesh.services.route.classify import LazyIntentClassifier
from stratamesh.stores.keys import ROUTE_CACHE, ROUTE_PENDING
from stratamesh.stores.redis import open_redis
from tests.integration.conftest import Env
from tests.integration.test_bus import read_all

CODEC = Codec()


@pytest.fixture(scope="module")
def classifier() -> LazyIntentClassifier:
    return LazyIntentClassifier()  # loads MiniLM once for the module


def admitted(tenant: str, prompt: str, rid: str) -> RequestAdmitted:
    return sample_event(
        RequestAdmitted,
        tenant=tenant,
        request_id=rid,
        query=Query(prompt=prompt),
        priority=Priority.PRO,
        guard_version="guard@test",
    )


def decoded(records: list[Any]) -> list[tuple[Any, dict[str, bytes]]]:
    return [(CODEC.decode(r.value), H.header_dict(r.headers)) for r in records]


async def start_route(env: Env, classifier: LazyIntentClassifier, **route: Any) -> Settings:
    route.setdefault("capacity_pool", f"it-{uuid.uuid4().hex}")
    route.setdefault("enabled_stages", ["retrieve", "infer", "guard_out"])  # what these test
    settings = env.settings.model_copy(
        update={"route": env.settings.route.model_copy(update=route)}
    )
    await env.start(build_service(settings, classifier=classifier), settings)
    return settings


async def wait_gone(settings: Settings, key: str, timeout: float = 20.0) -> None:
    redis = open_redis(settings)
    try:
        deadline = time.monotonic() + timeout
        while await redis.exists(key):
            assert time.monotonic() < deadline, f"{key} still present"
            await asyncio.sleep(0.05)
    finally:
        await redis.aclose()


async def test_cached_answer_skips_to_guard_out_until_its_document_changes(
    env: Env, classifier: LazyIntentClassifier
) -> None:
    guard, index = await env.publisher("guard"), await env.publisher("index")
    settings = await start_route(env, classifier)
    tenant = f"acme-{uuid.uuid4().hex[:8]}"

    await guard.publish(admitted(tenant, "How do I reset my password?", "r1"), next_stage="route")
    [(first, headers)] = decoded(await read_all(settings, T.REQUESTS_ROUTED, 1, timeout=60))
    assert isinstance(first, RequestRouted) and first.cache_hit is None
    assert headers[H.NEXT] == b"retrieve"
    assert [s.stage for s in first.slip.stages] == ["retrieve", "infer", "guard_out"]
    assert first.route.classification["in_scope"] in (0.0, 1.0)  # the real classifier ran
    assert first.versions["intent_model"] == "intent@1"

    # guard_out's result fills the cache (the pending note disappears when it is stored).
    cited = Citation(doc_id="kb-pw", doc_version=1, chunk_id="kb-pw:1:0", text="Settings > Reset")
    done = sample_event(
        RequestCompleted,
        tenant=tenant,
        request_id="r1",
        status=CompletionStatus.OK,
        answer="Open Settings and choose Reset [1].",
        citations=[cited],
    )
    await guard.publish(done)
    await wait_gone(settings, f"{ROUTE_PENDING}{tenant}:r1")

    await guard.publish(admitted(tenant, "how do I reset my password", "r2"), next_stage="route")
    await guard.publish(admitted(tenant, "How can I reset my password?", "r3"), next_stage="route")
    routed = decoded(await read_all(settings, T.REQUESTS_ROUTED, 3, timeout=30))
    by_id = {e.request_id: (e, h) for e, h in routed}
    for rid, kind in (("r2", "exact"), ("r3", "semantic")):
        event, headers = by_id[rid]
        assert event.cache_hit is not None and event.cache_hit.kind == kind, rid
        assert event.cache_hit.answer == "Open Settings and choose Reset [1]."
        assert event.cache_hit.citations == [cited]
        assert headers[H.NEXT] == b"guard_out"
        assert [s.stage for s in event.slip.stages] == ["guard_out"]
    assert by_id["r3"][0].cache_hit.similarity >= 0.92

    # A new version of the cited document: the answer is dropped, the question goes to retrieve.
    await index.publish(sample_event(ChunksIndexed, tenant=tenant, doc_id="kb-pw", doc_version=2))
    await wait_gone(settings, f"{ROUTE_CACHE}{tenant}:{first_digest(first)}")
    await guard.publish(admitted(tenant, "How do I reset my password?", "r4"), next_stage="route")
    routed = decoded(await read_all(settings, T.REQUESTS_ROUTED, 4, timeout=30))
    event, headers = next((e, h) for e, h in routed if e.request_id == "r4")
    assert event.cache_hit is None and headers[H.NEXT] == b"retrieve"


def first_digest(event: RequestRouted) -> str:
    return exact_digest(event.query.prompt, event.query)


async def test_over_budget_tenant_gets_over_budget_with_retry_after(
    env: Env, classifier: LazyIntentClassifier
) -> None:
    guard = await env.publisher("guard")
    tenant, other = f"thrifty-{uuid.uuid4().hex[:8]}", f"other-{uuid.uuid4().hex[:8]}"
    settings = await start_route(env, classifier, tenant_budgets={tenant: 0.0})
    await guard.publish(admitted(tenant, "What is my account balance?", "b1"), next_stage="route")
    await guard.publish(admitted(other, "What is my account balance?", "b2"), next_stage="route")
    [(refused, headers)] = decoded(await read_all(settings, T.RESULTS, 1, timeout=60))
    assert isinstance(refused, RequestCompleted) and refused.request_id == "b1"
    assert refused.status == CompletionStatus.OVER_BUDGET and refused.producer == "route"
    assert refused.retry_after_ms is not None and refused.retry_after_ms > 0
    assert refused.reason is not None and "cost budget" in refused.reason
    assert headers[H.TENANT] == tenant.encode()
    [(ok, _)] = decoded(await read_all(settings, T.REQUESTS_ROUTED, 1, timeout=10))
    assert ok.request_id == "b2" and ok.tenant == other  # other tenants are unaffected
    assert not await read_all(settings, T.dlq_of(T.REQUESTS_ADMITTED), 1, timeout=0.5)
