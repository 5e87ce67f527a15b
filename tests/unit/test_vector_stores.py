"""Both embedded engines behind VectorStore: tenant filter, versions, expiry, ACL, idempotent
upserts, aliases — and the index's write path (supersession whatever the arrival order)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from stratamesh.config import Settings
from stratamesh.errors import ConfigError
from stratamesh.events import (
    Chunk,
    ChunksEmbedded,
    EmbeddedChunk,
    KnowledgeClass,
    SparseVector,
)
from stratamesh.services.index.catalog import Catalog
from stratamesh.services.index.indexing import index_events
from stratamesh.services.index.search import rrf_fuse, search_chunks
from stratamesh.stores.vectors import (
    F_SUPERSEDED,
    F_TENANT,
    F_VERSION,
    FileAliasBook,
    SearchFilter,
    SearchSpec,
    SparseVec,
    VectorStore,
    open_alias_book,
    open_vector_store,
)

DIM = 8
MODEL = "unit-model@1"
T0 = datetime(2025, 6, 1, tzinfo=UTC)


def unit(i: int, j: int = -1) -> list[float]:
    """A unit vector on axis i (plus a little of axis j)."""
    v = [0.0] * DIM
    v[i % DIM] = 1.0
    if j >= 0:
        v[j % DIM] = 0.3
    return v


def embedded(
    tenant: str,
    doc_id: str,
    version: int,
    texts: list[str],
    *,
    at: datetime = T0,
    expires_at: datetime | None = None,
    acl: list[str] | None = None,
    metadata: dict[str, str] | None = None,
    model: str = MODEL,
    axis: int = 0,
) -> ChunksEmbedded:
    items = []
    for pos, text in enumerate(texts):
        chunk = Chunk(
            chunk_id=f"{doc_id}:{version}:{pos}",
            position=pos,
            text=text,
            section_path=["S"],
            token_count=len(text.split()),
            title=f"title {doc_id}",
            version=version,
            knowledge_class=KnowledgeClass.FLUID if expires_at else KnowledgeClass.ANCHORED,
            expires_at=expires_at,
            acl=acl or [],
            metadata=metadata or {},
        )
        items.append(
            EmbeddedChunk(
                chunk=chunk,
                dense=unit(axis + pos, axis + pos + 1),
                sparse=SparseVector(indices=[pos + 1, 100], values=[1.0, 0.5]),
            )
        )
    return ChunksEmbedded(
        event_id="0190d5e6-0000-7000-8000-000000000000",
        tenant=tenant,
        occurred_at=at,
        producer="embed",
        versions={},
        doc_id=doc_id,
        doc_version=version,
        embed_model=model,
        dim=DIM,
        embeddings=items,
    )


@pytest.fixture(params=["edge", "local"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[VectorStore]:
    settings = Settings(home=tmp_path)
    s = open_vector_store(settings, engine=request.param, in_memory=request.param == "local")
    yield s
    await s.close()


@pytest.fixture
def catalog(store: VectorStore) -> Catalog:
    return Catalog(store, "strata_chunks")


def now_ms(when: datetime = T0 + timedelta(days=1)) -> int:
    return int(when.timestamp() * 1000)


async def find(store: VectorStore, collection: str, tenant: str, **kw: Any) -> list[dict[str, Any]]:
    dense = kw.pop("dense", unit(0))
    sparse = kw.pop("sparse", None)
    ranked = await search_chunks(
        store,
        collection,
        SearchFilter(tenant=tenant, now_ms=kw.pop("now", now_ms()), **kw),
        dense=dense,
        sparse=sparse,
        top_k=50,
        prefetch_limit=50,
        rrf_k=60,
        mode="hybrid" if sparse else "dense",
    )
    return [r.hit.payload for r in ranked]


async def test_tenant_filter_and_idempotent_upserts(store: VectorStore, catalog: Catalog) -> None:
    # Two tenants index the *same* document (same chunk ids): neither sees or overwrites the other.
    a = embedded("a", "doc", 1, ["alpha one", "alpha two"])
    b = embedded("b", "doc", 1, ["beta one", "beta two"])
    [ra] = await index_events(store, catalog, [(a, "a")])
    await index_events(store, catalog, [(b, "b")])
    coll = ra.collection
    assert await store.count(coll) == 4
    await index_events(store, catalog, [(a, "a")])  # redelivery: nothing new
    assert await store.count(coll) == 4 and await store.count(coll, "a") == 2
    texts_a = {p["text"] for p in await find(store, coll, "a")}
    assert texts_a == {"alpha one", "alpha two"}
    assert {p[F_TENANT] for p in await find(store, coll, "b")} == {"b"}
    assert await find(store, coll, "nobody") == []


async def test_new_version_supersedes_and_history_stays_reachable(
    store: VectorStore, catalog: Catalog
) -> None:
    v1 = embedded("t", "doc", 1, ["old text"], at=T0)
    v2 = embedded("t", "doc", 2, ["new text", "more new"], at=T0 + timedelta(hours=1))
    [r1] = await index_events(store, catalog, [(v1, "t")])
    assert r1.superseded_version is None and r1.current
    [r2] = await index_events(store, catalog, [(v2, "t")])
    assert r2.superseded_version == 1
    coll = r2.collection
    assert {p["text"] for p in await find(store, coll, "t")} == {"new text", "more new"}
    every = await find(store, coll, "t", include_superseded=True)
    assert {p[F_VERSION] for p in every} == {1, 2}
    assert [p["text"] for p in await find(store, coll, "t", version=1)] == ["old text"]
    then = now_ms(T0 + timedelta(minutes=30))  # after v1, before v2
    assert [p["text"] for p in await find(store, coll, "t", as_of_ms=then)] == ["old text"]
    before = now_ms(T0 - timedelta(minutes=1))
    assert await find(store, coll, "t", as_of_ms=before) == []


async def test_late_older_version_arrives_already_superseded(
    store: VectorStore, catalog: Catalog
) -> None:
    v1 = embedded("t", "doc", 1, ["first"], at=T0)
    v2 = embedded("t", "doc", 2, ["second"], at=T0 + timedelta(hours=1))
    v3 = embedded("t", "doc", 3, ["third"], at=T0 + timedelta(hours=2))
    await index_events(store, catalog, [(v3, "t")])
    [_, late] = await index_events(store, catalog, [(v1, "t"), (v2, "t")])
    assert not late.current and late.superseded_version is None
    coll = late.collection
    assert [p["text"] for p in await find(store, coll, "t")] == ["third"]
    versions = await store.doc_versions(coll, "t", "doc")
    assert [(v.version, v.superseded) for v in versions] == [(1, True), (2, True), (3, False)]
    # v2 was valid between its own time and v3's
    mid = now_ms(T0 + timedelta(hours=1, minutes=30))
    assert [p["text"] for p in await find(store, coll, "t", as_of_ms=mid)] == ["second"]
    # one batch holding v1 and v2 of another document: v2 wins
    w1, w2 = embedded("t", "w", 1, ["w one"]), embedded("t", "w", 2, ["w two"])
    await index_events(store, catalog, [(w1, "t"), (w2, "t")])
    assert [p["text"] for p in await find(store, coll, "t", doc_ids=("w",))] == ["w two"]


async def test_expired_fluid_chunks_are_excluded(store: VectorStore, catalog: Catalog) -> None:
    fresh = embedded("t", "news", 1, ["fresh news"], expires_at=T0 + timedelta(days=30))
    stale = embedded("t", "old", 1, ["stale news"], expires_at=T0 + timedelta(hours=2))
    [r, _] = await index_events(store, catalog, [(fresh, "t"), (stale, "t")])
    coll = r.collection
    assert [p["text"] for p in await find(store, coll, "t")] == ["fresh news"]
    early = now_ms(T0 + timedelta(hours=1))
    assert {p["text"] for p in await find(store, coll, "t", now=early)} == {
        "fresh news",
        "stale news",
    }
    assert {p["text"] for p in await find(store, coll, "t", as_of_ms=early)} == {
        "fresh news",
        "stale news",
    }


async def test_acl_and_metadata_filters(store: VectorStore, catalog: Catalog) -> None:
    public = embedded("t", "pub", 1, ["public"], metadata={"lang": "en"})
    secret = embedded("t", "sec", 1, ["secret"], acl=["alice"], metadata={"lang": "de"})
    [r, _] = await index_events(store, catalog, [(public, "t"), (secret, "t")])
    coll = r.collection
    assert [p["text"] for p in await find(store, coll, "t")] == ["public"]
    assert {p["text"] for p in await find(store, coll, "t", principals=("alice",))} == {
        "public",
        "secret",
    }
    await catalog.ensure_metadata_indexes(coll, ["lang"])
    got = await find(store, coll, "t", principals=("alice",), metadata={"lang": "de"})
    assert [p["text"] for p in got] == ["secret"]


async def test_engine_rrf_matches_client_side_fusion(store: VectorStore, catalog: Catalog) -> None:
    docs = [embedded("t", f"d{i}", 1, [f"text {i}", f"more {i}"], axis=i) for i in range(6)]
    results = await index_events(store, catalog, [(d, "t") for d in docs])
    coll = results[0].collection
    flt = SearchFilter(tenant="t", now_ms=now_ms())
    spec = SearchSpec(flt, dense=unit(2, 3), sparse=SparseVec([1, 2], [1.0, 1.0]), limit=8)
    dense, sparse = await store.prefetch(coll, spec)
    assert dense and sparse
    fused = rrf_fuse([dense, sparse], 60)[:8]
    expected = [h.id for h in fused]
    engine_hits = await store.search(coll, spec)
    # RRF leaves the order of equal fused scores undefined (and engines break such ties
    # their own way): compare the fused scores, and the ids of each score group above the
    # cut-off, where membership cannot depend on how a tie at the cut was broken.
    assert [round(h.score, 6) for h in engine_hits] == [round(h.score, 6) for h in fused]
    cut = round(fused[-1].score, 6)

    def groups(hits: list[Any]) -> dict[float, set[str]]:
        out: dict[float, set[str]] = {}
        for h in hits:
            if round(h.score, 6) > cut:
                out.setdefault(round(h.score, 6), set()).add(h.id)
        return out

    assert groups(list(engine_hits)) == groups(fused)
    client = await search_chunks(
        store,
        coll,
        flt,
        dense=unit(2, 3),
        sparse=SparseVec([1, 2], [1.0, 1.0]),
        top_k=8,
        prefetch_limit=20,
        rrf_k=60,
        fusion="client",
    )
    assert [r.hit.id for r in client] == expected


async def test_collections_and_aliases(store: VectorStore, catalog: Catalog) -> None:
    [r1] = await index_events(store, catalog, [(embedded("t", "d", 1, ["x"]), "t")])
    first = r1.collection
    assert await catalog.live() == first  # the first collection becomes live
    [r2] = await index_events(
        store, catalog, [(embedded("t", "d", 1, ["x"], model="other@2"), "t")]
    )
    second = r2.collection
    assert second != first and await catalog.live() == first
    info = await store.collection_info(second)
    assert info is not None and (info.embed_model, info.dim, info.points) == ("other@2", DIM, 1)
    assert set(await store.list_collections()) >= {first, second}
    with pytest.raises(ConfigError):
        await store.ensure_collection(second, dim=DIM + 1, embed_model="other@2")
    # queries search the collection of their own model
    assert await catalog.for_query(MODEL) == first
    assert await catalog.for_query("other@2") == second
    assert await catalog.for_query("unknown@0") is None
    assert await catalog.for_query(MODEL, requested="elsewhere") is None
    assert await store.aliases.swap("strata_chunks", second) == first
    assert await store.aliases.previous("strata_chunks") == first
    assert await store.aliases.get("strata_chunks") == second
    catalog._alias_cache = None
    assert await catalog.for_query("other@2") == second
    assert await catalog.for_query(MODEL) == first  # old model's queries stay consistent
    assert await store.aliases.swap("strata_chunks", first) == second  # rollback


async def test_file_alias_book_is_shared_between_instances(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path)
    one = open_alias_book(settings, "edge")
    two = open_alias_book(settings, "edge")
    assert isinstance(one, FileAliasBook)
    assert await one.get("live") is None and await one.previous("live") is None
    assert await one.swap("live", "c1") is None
    assert await two.get("live") == "c1"
    assert await two.swap("live", "c2") == "c1"
    assert (await one.get("live"), await one.previous("live")) == ("c2", "c1")
    assert await one.swap("live", "c2") == "c2"  # no-op keeps the history
    assert await one.previous("live") == "c1"


async def test_payload_marks_superseded_flag(store: VectorStore, catalog: Catalog) -> None:
    await index_events(store, catalog, [(embedded("t", "d", 1, ["a"]), "t")])
    [r] = await index_events(store, catalog, [(embedded("t", "d", 2, ["b"]), "t")])
    every = await find(store, r.collection, "t", include_superseded=True)
    assert {(p[F_VERSION], p[F_SUPERSEDED]) for p in every} == {(1, True), (2, False)}
