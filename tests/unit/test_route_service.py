"""The route service in the in-memory harness: the real middleware, Redis (STRATA_REDIS_URL or
the embedded server), policy and prompt registry; a stand-in classifier (bag-of-words
vectors, keyword classes) so that cache similarity and policy branches are chosen here."""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from stratamesh.bus import headers as H
from stratamesh.bus import topics as T
from stratamesh.bus.testing import MemoryMesh
from stratamesh.config import Settings
from stratamesh.events import (
    ChunksIndexed,
    Citation,
    CompletionStatus,
    Cost,
    Priority,
    Query,
    RequestAdmitted,
    RequestCompleted,
    RequestRouted,
)
from stratamesh.events.testing import sample_event
from stratamesh.models.embedders import Vectors
from stratamesh.models.intent import Classification
from stratamesh.services.route.app import RouteService, build_service
from stratamesh.services.route.cache import normalise

DIM = 64


class KeywordClassifier:
    """Hashed bag of words (similar wording → high cosine); `risky`/`hard` set the classes."""

    version = "keywords@test"

    async def classify(self, texts: Sequence[str]) -> tuple[Vectors, list[Classification]]:
        vectors = np.zeros((len(texts), DIM), dtype=np.float32)
        classes = []
        for i, text in enumerate(texts):
            words = normalise(text).split()
            for w in words:
                vectors[i, hashlib.blake2b(w.encode(), digest_size=2).digest()[0] % DIM] += 1.0
            vectors[i] /= max(1e-9, float(np.linalg.norm(vectors[i])))
            classes.append(
                Classification(
                    "balance",
                    0.9,
                    "banking",
                    complexity=0.9 if "hard" in words else 0.1,
                    risk=0.9 if "risky" in words else 0.1,
                )
            )
        return vectors, classes


def tenant() -> str:
    return f"t-{uuid.uuid4().hex[:12]}"


def admitted(t: str, prompt: str, rid: str | None = None, **kw: Any) -> RequestAdmitted:
    return sample_event(
        RequestAdmitted,
        tenant=t,
        request_id=rid or uuid.uuid4().hex,
        query=Query(prompt=prompt),
        priority=kw.pop("priority", Priority.PRO),
        guard_version="guard@test",
        **kw,
    )


def completed(t: str, rid: str, answer: str, *cites: Citation, **kw: Any) -> RequestCompleted:
    return sample_event(
        RequestCompleted,
        tenant=t,
        request_id=rid,
        status=kw.pop("status", CompletionStatus.OK),
        answer=answer,
        citations=list(cites),
        model="smollm2@1",
        **kw,
    )


def settings_for(tmp_path: Path, **route: Any) -> Settings:
    route.setdefault("capacity_pool", f"test-{uuid.uuid4().hex}")
    route.setdefault("enabled_stages", ["retrieve", "infer", "guard_out"])  # what these test
    return Settings(
        home=tmp_path,
        redis_url=os.environ.get("STRATA_REDIS_URL"),
        route=route,  # type: ignore[arg-type]
    )


@pytest.fixture
async def svc() -> AsyncIterator[RouteService]:
    s = build_service(classifier=KeywordClassifier())
    yield s
    await s.stop()


def next_of(m: MemoryMesh, topic: str, i: int = -1) -> bytes:
    return H.header_dict(m.topics[topic][i].headers)[H.NEXT]


def routed(m: MemoryMesh) -> list[RequestRouted]:
    out = [e for e in m.events(T.REQUESTS_ROUTED) if isinstance(e, RequestRouted)]
    return out


def results(m: MemoryMesh) -> list[RequestCompleted]:
    return [e for e in m.events(T.RESULTS) if isinstance(e, RequestCompleted)]


async def test_request_is_classified_and_gets_its_slip(svc: RouteService, tmp_path: Path) -> None:
    m = MemoryMesh(svc, settings=settings_for(tmp_path))
    t = tenant()
    await m.publish(admitted(t, "What is my balance?", "r1"), as_="guard", next_stage="route")
    await m.publish(admitted(t, "risky hard question", "r2"), as_="guard", next_stage="route")
    await m.run_until_idle()
    first, second = routed(m)
    assert [s.stage for s in first.slip.stages] == ["retrieve", "infer", "guard_out"]
    assert first.slip.current == 0 and next_of(m, T.REQUESTS_ROUTED, 0) == b"retrieve"
    assert first.tenant == t and first.request_id == "r1" and first.cache_hit is None
    assert first.route.tier.value == "small" and first.route.retrieval.enabled
    assert first.route.template_version == "qa@1"
    assert first.versions["template"] == "qa@1"
    assert first.versions["route_policy"] == "default@1"
    assert first.versions["intent_model"] == "keywords@test"
    assert first.route.classification["risk"] == pytest.approx(0.1)
    assert first.route.classification["intent:balance"] == pytest.approx(0.9)
    assert first.stage_latency_ms["route"] >= first.stage_latency_ms["route_classify"] > 0
    # High risk + complex, but consensus/judge are not deployed: single, no judge, mid tier
    # (the high-risk-complex rule asks large; pro may have it).
    assert second.route.tier.value == "large" and second.route.consensus.mode.value == "single"
    assert [s.stage for s in second.slip.stages] == ["retrieve", "infer", "guard_out"]
    assert results(m) == []


async def test_answer_is_cached_then_served_to_guard_out(svc: RouteService, tmp_path: Path) -> None:
    m = MemoryMesh(svc, settings=settings_for(tmp_path))
    t, other = tenant(), tenant()
    cited = Citation(doc_id="faq", doc_version=1, chunk_id="faq:1:0", text="Reset it in settings.")
    await m.publish(
        admitted(t, "How do I reset my password", "r1"), as_="guard", next_stage="route"
    )
    await m.run_until_idle()
    await m.publish(completed(t, "r1", "Go to settings [1].", cited), as_="guard")
    await m.run_until_idle()

    # Same question, other form: exact hit.  Similar wording: semantic hit.  Other tenant: miss.
    await m.publish(
        admitted(t, "how do i reset my PASSWORD?", "r2"), as_="guard", next_stage="route"
    )
    await m.publish(
        admitted(t, "how do i reset my password please", "r3"), as_="guard", next_stage="route"
    )
    await m.publish(
        admitted(other, "How do I reset my password", "r4"), as_="guard", next_stage="route"
    )
    await m.run_until_idle()
    by_id = {e.request_id: e for e in routed(m)}
    exact, semantic, foreign = by_id["r2"], by_id["r3"], by_id["r4"]
    assert exact.cache_hit is not None and exact.cache_hit.kind == "exact"
    assert exact.cache_hit.answer == "Go to settings [1]." and exact.cache_hit.similarity == 1.0
    assert exact.cache_hit.source_request_id == "r1" and exact.cache_hit.citations == [cited]
    assert [s.stage for s in exact.slip.stages] == ["guard_out"] and exact.slip.current == 0
    assert semantic.cache_hit is not None and semantic.cache_hit.kind == "semantic"
    assert 0.92 <= semantic.cache_hit.similarity < 1.0
    assert foreign.cache_hit is None
    nexts = {
        e.request_id: H.header_dict(r.headers)[H.NEXT]
        for e, r in zip(m.events(T.REQUESTS_ROUTED), m.topics[T.REQUESTS_ROUTED], strict=True)
        if isinstance(e, RequestRouted)
    }
    assert nexts["r2"] == nexts["r3"] == b"guard_out" and nexts["r4"] == b"retrieve"

    # Version 2 of the cited document is indexed: the cached answer is gone.
    index = sample_event(ChunksIndexed, tenant=t, doc_id="faq", doc_version=2)
    await m.publish(index, as_="index")
    await m.run_until_idle()
    await m.publish(
        admitted(t, "How do I reset my password", "r5"), as_="guard", next_stage="route"
    )
    await m.run_until_idle()
    assert {e.request_id: e for e in routed(m)}["r5"].cache_hit is None


async def test_failed_cached_and_replayed_results_are_not_cached(
    svc: RouteService, tmp_path: Path
) -> None:
    m = MemoryMesh(svc, settings=settings_for(tmp_path))
    t = tenant()
    for rid in ("r1", "r2", "r3", "r4", "r5"):
        await m.publish(admitted(t, f"question {rid}", rid), as_="guard", next_stage="route")
    await m.run_until_idle()
    await m.publish(completed(t, "r1", "x", status=CompletionStatus.BLOCKED), as_="guard")
    await m.publish(completed(t, "r2", "x", cached=True), as_="guard")
    await m.publish(completed(t, "r3", "x"), as_="guard", replay=b"1")
    await m.publish(completed(t, "r4", "x", degradation="extractive"), as_="guard")
    await m.publish(completed(t, "r5", "x", degradation="full"), as_="guard")
    await m.run_until_idle()
    for rid in ("r1", "r2", "r3", "r4", "r5"):
        await m.publish(admitted(t, f"question {rid}", rid + "b"), as_="guard", next_stage="route")
    await m.run_until_idle()
    hits = {e.request_id for e in routed(m) if e.cache_hit is not None}
    assert hits == {"r5b"}  # only the full-quality ok answer was cached


async def test_rate_limited_tenant_gets_an_explicit_result(
    svc: RouteService, tmp_path: Path
) -> None:
    t = tenant()
    m = MemoryMesh(svc, settings=settings_for(tmp_path, tenant_rates={t: (0.5, 1.0)}))
    await m.publish(admitted(t, "one", "r1"), as_="guard", next_stage="route")
    await m.publish(admitted(t, "two", "r2"), as_="guard", next_stage="route")
    await m.run_until_idle()
    assert [e.request_id for e in routed(m)] == ["r1"]
    [refused] = results(m)
    assert refused.request_id == "r2" and refused.status == CompletionStatus.OVER_BUDGET
    assert refused.retry_after_ms is not None and 1000 <= refused.retry_after_ms <= 2000
    assert refused.reason is not None and "rate limit" in refused.reason
    assert refused.tenant == t and refused.producer == "route"
    assert len(m.topics[T.dlq_of(T.REQUESTS_ADMITTED)]) == 0


async def test_cost_budget_is_reserved_and_settled(svc: RouteService, tmp_path: Path) -> None:
    t = tenant()
    # The small tier reserves 0.0001 USD: room for two requests.
    m = MemoryMesh(svc, settings=settings_for(tmp_path, tenant_budgets={t: 0.00025}))
    for rid in ("r1", "r2", "r3"):
        await m.publish(admitted(t, f"q {rid}", rid), as_="guard", next_stage="route")
    await m.run_until_idle()
    assert [e.request_id for e in routed(m)] == ["r1", "r2"]
    assert routed(m)[1].route.budget.remaining_usd == pytest.approx(0.00005)
    [refused] = results(m)
    assert refused.status == CompletionStatus.OVER_BUDGET and "cost budget" in (
        refused.reason or ""
    )
    assert refused.retry_after_ms is not None and refused.retry_after_ms > 0
    # r1 turned out free: its reservation is returned, and r4 fits again.
    await m.publish(completed(t, "r1", "a", cost=Cost(cost_usd=0.0)), as_="guard")
    await m.run_until_idle()
    await m.publish(admitted(t, "q r4", "r4"), as_="guard", next_stage="route")
    await m.run_until_idle()
    assert [e.request_id for e in routed(m)] == ["r1", "r2", "r4"]


async def test_replays_consume_no_budget(svc: RouteService, tmp_path: Path) -> None:
    t = tenant()
    m = MemoryMesh(svc, settings=settings_for(tmp_path, tenant_rates={t: (0.01, 1.0)}))
    for rid in ("r1", "r2", "r3"):
        await m.publish(admitted(t, "same", rid), as_="guard", next_stage="route", replay=b"1")
    await m.publish(admitted(t, "live", "r4"), as_="guard", next_stage="route")
    await m.run_until_idle()
    assert [e.request_id for e in routed(m)] == ["r1", "r2", "r3", "r4"]
    assert results(m) == []


async def test_free_lane_is_shed_first(svc: RouteService, tmp_path: Path) -> None:
    m = MemoryMesh(svc, settings=settings_for(tmp_path, capacity_per_s=0.01, capacity_burst=4.0))
    # Pool of 4: free keeps 2 in reserve, so the 3rd free request is shed; enterprise is not.
    rids = [("f1", Priority.FREE), ("f2", Priority.FREE), ("f3", Priority.FREE)]
    rids += [("e1", Priority.ENTERPRISE), ("e2", Priority.ENTERPRISE)]
    for rid, lane in rids:
        await m.publish(
            admitted(tenant(), rid, rid, priority=lane), as_="guard", next_stage="route"
        )
    await m.run_until_idle()
    assert [e.request_id for e in routed(m)] == ["f1", "f2", "e1", "e2"]
    [shed] = results(m)
    assert shed.request_id == "f3" and shed.status == CompletionStatus.OVERLOADED
    assert shed.priority == Priority.FREE and (shed.retry_after_ms or 0) > 0


async def test_tenant_cannot_promote_its_lane(svc: RouteService, tmp_path: Path) -> None:
    t = tenant()
    m = MemoryMesh(svc, settings=settings_for(tmp_path, tenant_priority={t: "free"}))
    await m.publish(
        admitted(t, "hard", "r1", priority=Priority.ENTERPRISE), as_="guard", next_stage="route"
    )
    await m.run_until_idle()
    [out] = routed(m)
    assert out.priority == Priority.FREE and out.route.tier.value == "mid"  # large capped
