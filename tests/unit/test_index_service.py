"""The index service in the in-memory harness: same middleware, a real in-process store."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from stratamesh.bus import headers as H
from stratamesh.bus import topics as T
from stratamesh.bus.publish import event_record
from stratamesh.bus.testing import MemoryMesh
from stratamesh.config import Settings
from stratamesh.events import (
    ChunksIndexed,
    ContextRetrieved,
    QueryEmbedded,
    RetrievalPlan,
    RouteDecision,
    RoutingSlip,
    SlipStage,
    SparseVector,
)
from stratamesh.events.testing import sample_event
from stratamesh.obs.metrics import REGISTRY
from stratamesh.services.index.app import IndexService
from stratamesh.stores.vectors import VectorStore, open_vector_store
from tests.unit.test_vector_stores import DIM, MODEL, embedded, unit


@pytest.fixture
async def mesh(tmp_path: Path) -> AsyncIterator[tuple[MemoryMesh, VectorStore]]:
    settings = Settings(home=tmp_path)
    store = open_vector_store(settings, engine="edge")
    svc = IndexService()
    svc.bind(settings, store)
    yield MemoryMesh(svc, settings=settings), store
    await store.close()


def query(tenant: str, axis: int, **plan: object) -> QueryEmbedded:
    base = sample_event(QueryEmbedded, tenant=tenant, request_id=f"r-{axis}")
    route = base.route.model_copy(update={"retrieval": RetrievalPlan(**plan)})  # type: ignore[arg-type]
    return base.model_copy(
        update={
            "embed_model": MODEL,
            "dim": DIM,
            "dense": unit(axis),
            "sparse": SparseVector(indices=[1], values=[1.0]),
            "route": RouteDecision.model_validate(route.model_dump()),
            "slip": RoutingSlip(
                stages=[SlipStage(stage="retrieve"), SlipStage(stage="infer")], current=0
            ),
        }
    )


def lag_count() -> float:
    return REGISTRY.get_sample_value("strata_index_lag_seconds_count") or 0.0


async def test_embedded_chunks_are_indexed_and_retrieved(
    mesh: tuple[MemoryMesh, VectorStore],
) -> None:
    m, _ = mesh
    before = lag_count()
    await m.publish(embedded("acme", "d1", 1, ["one", "two", "three"], axis=0), as_="embed")
    await m.publish(embedded("acme", "d1", 2, ["uno", "dos"], axis=0), as_="embed")
    await m.run_until_idle()
    first, second = m.events(T.DOCS_INDEXED)
    assert isinstance(first, ChunksIndexed) and isinstance(second, ChunksIndexed)
    assert (first.count, first.chunk_ids, first.superseded_version) == (
        3,
        ["d1:1:0", "d1:1:1", "d1:1:2"],
        None,
    )
    assert (second.count, second.superseded_version, second.tenant) == (2, 1, "acme")
    assert second.collection.startswith("strata_chunks__") and second.embed_model == MODEL
    assert second.index_lag_ms > 0 and lag_count() == before + 2

    await m.publish(query("acme", 0), as_="embed", next_stage="retrieve")
    await m.run_until_idle()
    [out] = m.events(T.REQUESTS_RETRIEVED)
    assert isinstance(out, ContextRetrieved)
    assert out.tenant == "acme" and out.slip.current == 1 and out.collection == second.collection
    assert {c.doc_version for c in out.context} == {2}  # v1 is superseded
    assert out.context[0].rank == 0 and out.context[0].chunk_id == "d1:2:0"
    assert "retrieve" in out.stage_latency_ms
    record = m.topics[T.REQUESTS_RETRIEVED][0]
    assert H.header_dict(record.headers)[H.NEXT] == b"infer"


async def test_query_tenant_is_the_envelope_tenant(mesh: tuple[MemoryMesh, VectorStore]) -> None:
    m, _ = mesh
    await m.publish(embedded("victim", "secret", 1, ["the secret"], axis=0), as_="embed")
    await m.run_until_idle()
    # Same content, a filter naming the victim, its collection: nothing of the victim.
    q = query("mallory", 0, filters={"tenant": "victim", "doc_id": "secret"})
    await m.publish(q, as_="embed", next_stage="retrieve")
    # A forged record: header says mallory, payload says victim → dead-lettered, no answer.
    forged = query("victim", 0).model_copy(update={"request_id": "forged"})
    rec = event_record(m.codec, "embed", forged, T.REQUESTS_EMBEDDED, next_stage="retrieve")
    rec.headers = [(k, b"mallory" if k == H.TENANT else v) for k, v in rec.headers]
    m.append(rec)
    await m.run_until_idle()
    [out] = m.events(T.REQUESTS_RETRIEVED)
    assert out.tenant == "mallory" and out.context == []
    assert len(m.topics[T.dlq_of(T.REQUESTS_EMBEDDED)]) == 1


async def test_unknown_model_and_disabled_plan_give_empty_context(
    mesh: tuple[MemoryMesh, VectorStore],
) -> None:
    m, _ = mesh
    await m.publish(embedded("acme", "d", 1, ["x"]), as_="embed")
    await m.run_until_idle()
    other = query("acme", 0).model_copy(update={"embed_model": "other@9"})
    await m.publish(other, as_="embed", next_stage="retrieve")
    await m.publish(query("acme", 1, enabled=False), as_="embed", next_stage="retrieve")
    await m.publish(query("acme", 2, filters={"version": "x"}), as_="embed", next_stage="retrieve")
    await m.run_until_idle()
    outs = m.events(T.REQUESTS_RETRIEVED)
    assert len(outs) == 3 and all(o.context == [] for o in outs)
    assert outs[0].collection == ""


async def test_index_lag_starts_at_the_submission_time_when_carried(
    mesh: tuple[MemoryMesh, VectorStore],
) -> None:
    m, store = mesh
    ev = embedded("acme", "d", 1, ["x"], at=datetime.now(UTC))
    submitted = int(ev.occurred_at.timestamp() * 1000) - 3000
    await m.publish(
        ev.model_copy(update={"versions": {"submitted_at": str(submitted)}}), as_="embed"
    )
    bogus = embedded("acme", "e", 1, ["y"], at=datetime.now(UTC))
    await m.publish(bogus.model_copy(update={"versions": {"submitted_at": "soon"}}), as_="embed")
    await m.run_until_idle()
    carried, own = m.events(T.DOCS_INDEXED)
    assert 3000 <= carried.index_lag_ms < 13_000
    assert 0 <= own.index_lag_ms < 3000
    [version] = await store.doc_versions(carried.collection, "acme", "d")
    assert version.valid_from == submitted
