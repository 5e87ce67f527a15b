"""The index service on the real broker, with real MiniLM vectors and the real embedded
store (qdrant-edge under the test's home): chunks become searchable, queries get citations,
tenants stay apart under attack, and a re-index by replay swaps the alias."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from stratamesh.bus import headers as H
from stratamesh.bus import topics as T
from stratamesh.bus.codec import Codec
from stratamesh.config import IndexSettings
from stratamesh.events import (
    Chunk,
    ChunksEmbedded,
    ChunksIndexed,
    ContextRetrieved,
    DocumentChunked,
    EmbeddedChunk,
    KnowledgeClass,
    QueryEmbedded,
    RetrievalPlan,
    RouteDecision,
    RoutingSlip,
    SlipStage,
    SparseVector,
    new_event_id,
)
from stratamesh.events.testing import sample_event
from stratamesh.models.embedders import DEFAULT_MODEL, LocalEmbedder, model_stamp
from stratamesh.models.sparse import SPARSE_MODEL, document_vector, query_vector
from stratamesh.reindex import REINDEX_IDENTITY, reindex
from stratamesh.services.embed.app import build_service
from stratamesh.services.index.app import IndexService
from stratamesh.stores.vectors import collection_name, open_alias_book
from tests.httpserver import JsonServer
from tests.integration.conftest import Env
from tests.integration.test_bus import read_all

SEARCHABLE_WITHIN_S = 5.0  # docs.embedded published → docs.indexed received (stated bound)

DOCS = {
    "insulin": "Obesity induces insulin resistance in mice fed a high-fat diet.",
    "p53": "The tumour suppressor p53 regulates apoptosis after DNA damage.",
    "sleep": "Sleep deprivation impairs memory consolidation in the hippocampus.",
}


@pytest.fixture(scope="module")
def minilm() -> LocalEmbedder:
    embedder = LocalEmbedder()
    embedder.load()
    return embedder


def text_of(chunk: Chunk) -> str:
    return f"{chunk.title}\n{chunk.text}" if chunk.title else chunk.text


def make_chunks(
    doc_id: str,
    version: int,
    texts: list[str],
    *,
    expires_at: datetime | None = None,
) -> list[Chunk]:
    return [
        Chunk(
            chunk_id=f"{doc_id}:{version}:{i}",
            position=i,
            text=t,
            section_path=["Results", doc_id],
            token_count=len(t.split()),
            title=f"Study {doc_id}",
            version=version,
            knowledge_class=KnowledgeClass.FLUID if expires_at else KnowledgeClass.ANCHORED,
            expires_at=expires_at,
            acl=[],
            metadata={"source": "test"},
        )
        for i, t in enumerate(texts)
    ]


def embedded(
    minilm: LocalEmbedder,
    tenant: str,
    doc_id: str,
    texts: list[str],
    *,
    version: int = 1,
    expires_at: datetime | None = None,
) -> ChunksEmbedded:
    chunks = make_chunks(doc_id, version, texts, expires_at=expires_at)
    dense = minilm.embed_sync([text_of(c) for c in chunks])
    items = []
    for chunk, vec in zip(chunks, dense, strict=True):
        sv = document_vector(text_of(chunk))
        items.append(
            EmbeddedChunk(
                chunk=chunk,
                dense=vec.tolist(),
                sparse=SparseVector(indices=sv.indices, values=sv.values),
            )
        )
    return ChunksEmbedded(
        event_id=new_event_id(),
        tenant=tenant,
        occurred_at=datetime.now(UTC),
        producer="embed",
        versions={},
        doc_id=doc_id,
        doc_version=version,
        embed_model=model_stamp(minilm),
        dim=384,
        sparse_model=SPARSE_MODEL,
        embeddings=items,
    )


def query(
    minilm: LocalEmbedder,
    tenant: str,
    request_id: str,
    prompt: str,
    *,
    stamp: str | None = None,
    **plan: Any,
) -> QueryEmbedded:
    base = sample_event(QueryEmbedded, tenant=tenant, request_id=request_id)
    route = base.route.model_dump()
    route["retrieval"] = RetrievalPlan(**plan).model_dump()
    sv = query_vector(prompt)
    return base.model_copy(
        update={
            "query": base.query.model_copy(update={"prompt": prompt}),
            "route": RouteDecision.model_validate(route),
            "slip": RoutingSlip(
                stages=[SlipStage(stage=s) for s in ("retrieve", "infer", "guard_out")]
            ),
            "embed_model": stamp or model_stamp(minilm),
            "dim": 384,
            "dense": minilm.embed_sync([prompt])[0].tolist(),
            "sparse": SparseVector(indices=sv.indices, values=sv.values),
        }
    )


def decode(env: Env, records: list[Any]) -> list[Any]:
    codec = Codec.from_settings(env.settings)
    return [codec.decode(r.value) for r in records]


async def test_chunks_become_searchable_and_queries_get_citations(
    env: Env, minilm: LocalEmbedder
) -> None:
    embed = await env.publisher("embed")
    await env.start(IndexService())
    started = time.monotonic()
    for doc_id, text in DOCS.items():
        await embed.publish(
            embedded(minilm, "acme", doc_id, [text, f"Methods of the {doc_id} study."])
        )
    indexed = decode(env, await read_all(env.settings, T.DOCS_INDEXED, 3, timeout=30))
    assert time.monotonic() - started < SEARCHABLE_WITHIN_S
    assert all(isinstance(e, ChunksIndexed) and e.count == 2 for e in indexed)
    assert {e.doc_id for e in indexed} == set(DOCS)
    live = indexed[0].collection
    assert live == collection_name("strata_chunks", model_stamp(minilm))
    assert all(0 < e.index_lag_ms < SEARCHABLE_WITHIN_S * 1000 for e in indexed)

    # A new version of `insulin` supersedes v1; an expired fluid document never shows.
    await embed.publish(
        embedded(minilm, "acme", "insulin", ["High-fat diets cause insulin resistance."], version=2)
    )
    past = datetime.now(UTC) - timedelta(minutes=1)
    await embed.publish(
        embedded(minilm, "acme", "expired", ["Insulin resistance news, expired."], expires_at=past)
    )
    more = decode(env, await read_all(env.settings, T.DOCS_INDEXED, 5, timeout=30))
    [v2] = [e for e in more if e.doc_id == "insulin" and e.doc_version == 2]
    assert v2.superseded_version == 1

    await embed.publish(
        query(minilm, "acme", "q-1", "What causes insulin resistance?"), next_stage="retrieve"
    )
    [record] = await read_all(env.settings, T.REQUESTS_RETRIEVED, 1, timeout=30)
    assert H.header_dict(record.headers)[H.NEXT] == b"infer"
    [out] = decode(env, [record])
    assert isinstance(out, ContextRetrieved)
    assert out.tenant == "acme" and out.slip.current == 1 and out.collection == live
    assert out.embed_model == model_stamp(minilm)
    best = out.context[0]
    assert (best.rank, best.doc_id, best.doc_version, best.chunk_id) == (
        0,
        "insulin",
        2,
        "insulin:2:0",
    )
    assert best.title == "Study insulin" and best.section_path == ["Results", "insulin"]
    assert best.text == "High-fat diets cause insulin resistance." and best.score > 0
    assert out.context[-1].rank == 1  # position-aware: second best last
    assert sorted(c.rank for c in out.context) == list(range(len(out.context)))
    assert all(c.doc_id != "expired" for c in out.context)
    assert all((c.doc_id, c.doc_version) != ("insulin", 1) for c in out.context)


async def test_tenant_isolation_under_adversarial_queries(env: Env, minilm: LocalEmbedder) -> None:
    embed = await env.publisher("embed")
    await env.start(IndexService())
    secrets = {
        "merger": "Bravo Corp plans to acquire Delta Industries for 4.2 billion in March.",
        "salary": "The bravo executive salary table lists the CEO at 3.1 million per year.",
        "patent": "Bravo's unreleased solid-state battery reaches 510 Wh per kilogram.",
    }
    for doc_id, text in secrets.items():
        await embed.publish(embedded(minilm, "bravo", doc_id, [text]))
    await embed.publish(embedded(minilm, "alpha", "menu", ["The alpha cafeteria serves soup."]))
    indexed = decode(env, await read_all(env.settings, T.DOCS_INDEXED, 4, timeout=30))
    live = indexed[0].collection
    bravo_chunks = {f"{d}:1:0" for d in secrets}

    plans: list[dict[str, Any]] = [
        {},
        {"filters": {"tenant": "bravo"}},
        {"filters": {"doc_id": "merger,salary,patent"}},
        {"include_superseded": True, "top_k": 20, "prefetch_k": 100},
        {"collection": live},
        {"collection": "strata_chunks"},
        {"filters": {"version": "1"}, "dense": False},
        {"sparse": False, "rrf_k": 1},
    ]
    sent = []
    for i, plan in enumerate(plans):
        for text in secrets.values():
            rid = f"attack-{i}-{len(sent)}"
            q = query(minilm, "alpha", rid, text, **plan)
            q = q.model_copy(
                update={"query": q.query.model_copy(update={"principals": ["bravo", "ceo"]})}
            )
            await embed.publish(q, next_stage="retrieve")
            sent.append(rid)
    # Forged: the envelope says alpha, the payload says bravo (signed by a real key).
    forged = query(minilm, "bravo", "forged", secrets["merger"])
    rec = embed.record(forged, next_stage="retrieve")
    rec.headers = [(k, b"alpha" if k == H.TENANT else v) for k, v in rec.headers]
    await embed.producer.send(rec)
    # Control: bravo itself finds its documents (the attack queries could have matched).
    await embed.publish(query(minilm, "bravo", "control", secrets["merger"]), next_stage="retrieve")

    outs = decode(
        env, await read_all(env.settings, T.REQUESTS_RETRIEVED, len(sent) + 1, timeout=60)
    )
    by_id = {o.request_id: o for o in outs}
    assert set(sent) <= set(by_id) and "forged" not in by_id
    for rid in sent:
        out = by_id[rid]
        assert out.tenant == "alpha"
        assert not {c.chunk_id for c in out.context} & bravo_chunks
        assert all(c.text not in secrets.values() for c in out.context)
        assert all(c.doc_id == "menu" for c in out.context)
    assert by_id["control"].context[0].chunk_id == "merger:1:0"
    dlq = await read_all(env.settings, T.dlq_of(T.REQUESTS_EMBEDDED), 1, timeout=30)
    assert [H.header_dict(r.headers)[H.REQUEST_ID] for r in dlq] == [b"forged"]


def document(doc_id: str, text: str) -> DocumentChunked:
    return sample_event(
        DocumentChunked,
        doc_id=doc_id,
        doc_version=1,
        tenant="acme",
        title=f"Study {doc_id}",
        chunks=make_chunks(doc_id, 1, [text]),
    )


async def test_reindex_by_replay_builds_a_collection_and_swaps_the_alias(
    env: Env, minilm: LocalEmbedder
) -> None:
    ingest = await env.publisher("ingest")
    embed = await env.publisher("embed")
    env.identity(REINDEX_IDENTITY)  # before the index loads its keyring
    await env.start(build_service(env.settings, embedder=minilm))
    await env.start(IndexService())
    for doc_id, text in DOCS.items():
        await ingest.publish(document(doc_id, text))
    first = decode(env, await read_all(env.settings, T.DOCS_INDEXED, 3, timeout=60))
    old = first[0].collection
    prompt = "How does p53 respond to DNA damage?"
    await embed.publish(query(minilm, "acme", "before", prompt), next_stage="retrieve")
    [before] = decode(env, await read_all(env.settings, T.REQUESTS_RETRIEVED, 1, timeout=30))

    # The same weights under another model id (the model folder): a new collection.
    model_dir = str(Path(minilm.path))
    states: list[dict[str, Any]] = []
    result = await reindex(
        env.settings, model_dir, progress=lambda **s: states.append(s), poll_s=0.2
    )
    new_stamp = result.embed_model
    assert new_stamp.startswith(model_dir + "@") and new_stamp != model_stamp(minilm)
    assert result.previous == old and result.collection != old and result.chunks == 3
    assert result.collection == collection_name("strata_chunks", new_stamp)
    book = open_alias_book(env.settings)
    assert await book.get("strata_chunks") == result.collection
    assert states[-1]["phase"] == "swapped"
    assert any(s["lag"] > 0 or s["indexed"] < 3 for s in states[:-1])  # it really waited

    await embed.publish(
        query(minilm, "acme", "after", prompt, stamp=new_stamp), next_stage="retrieve"
    )
    await embed.publish(query(minilm, "acme", "old-model", prompt), next_stage="retrieve")
    outs = decode(env, await read_all(env.settings, T.REQUESTS_RETRIEVED, 3, timeout=30))
    by_id = {o.request_id: o for o in outs}
    after, stale = by_id["after"], by_id["old-model"]
    assert after.collection == result.collection and stale.collection == old
    ids = [c.chunk_id for c in before.context]
    assert [c.chunk_id for c in after.context] == ids and ids[0] == "p53:1:0"
    assert [round(c.score, 4) for c in after.context] == [round(c.score, 4) for c in before.context]

    back = await reindex(env.settings, "", rollback=True)
    assert back.rolled_back and back.collection == old and back.previous == result.collection
    assert await book.get("strata_chunks") == old
    assert DEFAULT_MODEL in model_stamp(minilm)


def methods_first(path: str, body: Any) -> tuple[int, Any]:
    """A TEI-style reranker that prefers the 'Methods' chunks (the fused order never does)."""
    return 200, [
        {"index": i, "score": 0.9 if "Methods" in t else 0.1} for i, t in enumerate(body["texts"])
    ]


async def test_rerank_reorders_the_fused_candidates_and_degrades_when_the_server_fails(
    env: Env, minilm: LocalEmbedder
) -> None:
    async with JsonServer(methods_first) as server:
        index = IndexSettings(rerank_endpoint=server.url, rerank_model="reranker-test")
        settings = env.settings.model_copy(update={"index": index})
        embed = await env.publisher("embed")
        await env.start(IndexService(), settings)
        for doc_id, text in DOCS.items():
            await embed.publish(
                embedded(minilm, "acme", doc_id, [text, f"Methods of the {doc_id} study."])
            )
        await read_all(env.settings, T.DOCS_INDEXED, 3, timeout=30)
        prompt = "What causes insulin resistance?"

        await embed.publish(query(minilm, "acme", "fused", prompt, top_k=2), next_stage="retrieve")
        await embed.publish(
            query(minilm, "acme", "reranked", prompt, top_k=2, rerank=True, rerank_top_n=6),
            next_stage="retrieve",
        )
        outs = decode(env, await read_all(env.settings, T.REQUESTS_RETRIEVED, 2, timeout=30))
        by_id = {o.request_id: o for o in outs}
        fused, reranked = by_id["fused"], by_id["reranked"]
        assert fused.context[0].chunk_id == "insulin:1:0" and "reranker" not in fused.versions
        assert reranked.versions["reranker"] == "reranker-test"
        assert len(reranked.context) == 2
        assert all(c.text.startswith("Methods") and c.score == 0.9 for c in reranked.context)
        [(path, body)] = server.requests
        assert path == "/rerank" and body["query"] == prompt and len(body["texts"]) == 6

        server.respond = lambda path, body: (503, {"error": "loading"})
        await embed.publish(
            query(minilm, "acme", "degraded", prompt, top_k=2, rerank=True),
            next_stage="retrieve",
        )
        outs = decode(env, await read_all(env.settings, T.REQUESTS_RETRIEVED, 3, timeout=60))
        [degraded] = [o for o in outs if o.request_id == "degraded"]
        assert degraded.versions["reranker"].startswith("skipped")
        assert [c.chunk_id for c in degraded.context] == [c.chunk_id for c in fused.context]
