"""The embed service in memory, with a tiny deterministic embedder: batching and outputs."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from typing import Any

import httpx
import numpy as np
import pytest

from stratamesh.bus import headers as H
from stratamesh.bus import topics as T
from stratamesh.bus.middleware import DeadLettered, Handled, Skipped
from stratamesh.bus.testing import MemoryMesh
from stratamesh.config import Settings
from stratamesh.errors import ConfigError, Poison, Transient
from stratamesh.events import (
    Chunk,
    ChunksEmbedded,
    DocumentChunked,
    KnowledgeClass,
    QueryEmbedded,
    RequestRouted,
    RoutingSlip,
    SlipStage,
    derived_event_id,
)
from stratamesh.events.testing import sample_event
from stratamesh.models.embedders import (
    DEFAULT_MODEL,
    LocalEmbedder,
    OpenAIEmbedder,
    Vectors,
    make_embedder,
    model_stamp,
)
from stratamesh.models.sparse import SPARSE_MODEL, document_vector, query_vector
from stratamesh.resilience import Backoff, BreakerState, CircuitBreaker, CircuitOpen
from stratamesh.services.embed.app import build_service, chunk_text
from stratamesh.services.embed.cache import MemoryEmbeddingCache

DIM = 8


def fake_vector(text: str) -> Vectors:
    raw = np.frombuffer(hashlib.sha256(text.encode()).digest()[: DIM * 4], dtype="<u4")
    v = raw.astype(np.float32) / 2**32 - 0.5
    return (v / np.linalg.norm(v)).astype(np.float32)


class FakeEmbedder:
    """Deterministic vectors; records each call's texts; fails on request."""

    model_id = "fake-embed"
    revision = "r1"

    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.poison: set[str] = set()
        self.transient_failures = 0

    async def embed(self, texts: Sequence[str]) -> Vectors:
        self.calls.append(list(texts))
        if self.transient_failures > 0:
            self.transient_failures -= 1
            raise Transient("endpoint blipped")
        if self.poison & set(texts):
            raise Poison("endpoint refuses this text")
        return np.stack([fake_vector(t) for t in texts])

    async def aclose(self) -> None:
        return None


def settings(batch_size: int = 4) -> Settings:
    return Settings(redis_url=None, embed={"batch_size": batch_size, "batch_wait_ms": 5})  # type: ignore[arg-type]


def chunk(doc: str, i: int, text: str, title: str = "") -> Chunk:
    return Chunk(
        chunk_id=f"{doc}#{i}",
        position=i,
        text=text,
        section_path=["Intro"],
        token_count=len(text.split()),
        title=title,
        version=1,
        knowledge_class=KnowledgeClass.ANCHORED,
        acl=[],
        metadata={},
    )


def document(doc: str, texts: list[str], title: str = "") -> DocumentChunked:
    return sample_event(
        DocumentChunked,
        doc_id=doc,
        doc_version=1,
        tenant="acme",
        title=title,
        versions={"chunker": "c1"},
        chunks=[chunk(doc, i, t, title) for i, t in enumerate(texts)],
    )


def routed(request_id: str, prompt: str) -> RequestRouted:
    slip = RoutingSlip(
        stages=[SlipStage(stage=s, params={}) for s in ("retrieve", "infer", "guard_out")],
        current=0,
    )
    event = sample_event(RequestRouted, request_id=request_id, tenant="acme", slip=slip)
    return event.model_copy(update={"query": event.query.model_copy(update={"prompt": prompt})})


def mesh_with(fake: FakeEmbedder, batch_size: int = 4, **kw: object) -> MemoryMesh:
    s = settings(batch_size)
    return MemoryMesh(build_service(s, embedder=fake, **kw), settings=s)  # type: ignore[arg-type]


async def test_a_batch_of_documents_is_one_model_call_and_one_output_per_document() -> None:
    fake = FakeEmbedder()
    mesh = mesh_with(fake, batch_size=4)
    docs = [
        document("d1", ["alpha cells", "beta cells"], title="Islets"),
        document("d2", ["gamma rays", "delta waves", "epsilon"]),
        document("d3", ["zeta function"]),
    ]
    for d in docs:
        await mesh.publish(d, as_="ingest")
    await mesh.run_until_idle()

    # three records in one batch → one call with the six texts, in order
    assert fake.calls == [[chunk_text(c) for d in docs for c in d.chunks]]
    assert fake.calls[0][0] == "Islets\nalpha cells"
    out = mesh.events(T.DOCS_EMBEDDED)
    assert [type(e) for e in out] == [ChunksEmbedded] * 3
    for d, e in zip(docs, out, strict=True):
        assert isinstance(e, ChunksEmbedded)
        assert e.event_id == derived_event_id(d.event_id, "embed", 0)
        assert (e.doc_id, e.doc_version, e.tenant, e.producer) == (d.doc_id, 1, "acme", "embed")
        assert e.embed_model == "fake-embed@r1" and e.dim == DIM
        assert e.sparse_model == SPARSE_MODEL
        assert e.versions == {
            "chunker": "c1",
            "embed_model": "fake-embed@r1",
            "sparse_model": SPARSE_MODEL,
        }
        assert [x.chunk for x in e.embeddings] == d.chunks
        for x in e.embeddings:
            text = chunk_text(x.chunk)
            assert np.allclose(x.dense, fake_vector(text), atol=1e-6)
            expected = document_vector(text)
            assert x.sparse.indices == expected.indices
            assert np.allclose(x.sparse.values, expected.values, atol=1e-6)


async def test_records_beyond_the_batch_size_go_in_the_next_call() -> None:
    fake = FakeEmbedder()
    mesh = mesh_with(fake, batch_size=4)
    for i in range(6):
        await mesh.publish(document(f"d{i}", [f"text {i}"]), as_="ingest")
    await mesh.run_until_idle()
    assert [len(c) for c in fake.calls] == [4, 2]
    assert len(mesh.events(T.DOCS_EMBEDDED)) == 6


async def test_duplicate_texts_are_embedded_once_and_cached_texts_not_at_all() -> None:
    fake = FakeEmbedder()
    cache = MemoryEmbeddingCache()
    mesh = mesh_with(fake, batch_size=8, cache=cache)
    await mesh.publish(document("d1", ["same text", "same text", "other"]), as_="ingest")
    await mesh.run_until_idle()
    assert fake.calls == [["same text", "other"]]
    await mesh.publish(document("d2", ["other", "new"]), as_="ingest")
    await mesh.run_until_idle()
    assert fake.calls[1] == ["new"]  # "other" came from the cache
    first, second = mesh.events(T.DOCS_EMBEDDED)
    assert isinstance(first, ChunksEmbedded) and isinstance(second, ChunksEmbedded)
    assert first.embeddings[0].dense == first.embeddings[1].dense
    assert second.embeddings[0].dense == first.embeddings[2].dense
    assert len(cache.data) == 3
    assert all(k.startswith("strata:emb:fake-embed@r1:") for k in cache.data)


async def test_a_document_without_chunks_still_gets_its_event() -> None:
    fake = FakeEmbedder()
    mesh = mesh_with(fake)
    await mesh.publish(document("empty", []), as_="ingest")
    await mesh.run_until_idle()
    [e] = mesh.events(T.DOCS_EMBEDDED)
    assert isinstance(e, ChunksEmbedded) and e.embeddings == [] and fake.calls == []


async def test_a_rejected_text_dead_letters_its_record_only() -> None:
    fake = FakeEmbedder()
    fake.poison = {"bad"}
    mesh = mesh_with(fake, batch_size=4)
    for name, text in [("d1", "good one"), ("d2", "bad"), ("d3", "good two")]:
        await mesh.publish(document(name, [text]), as_="ingest")
    await mesh.run_until_idle()
    # the batch failed, then each record alone
    assert fake.calls == [["good one", "bad", "good two"], ["good one"], ["bad"], ["good two"]]
    outcomes = [type(o) for _, _, o in mesh.outcomes]
    assert outcomes[:3] == [Handled, DeadLettered, Handled]
    assert [e.doc_id for e in mesh.events(T.DOCS_EMBEDDED)] == ["d1", "d3"]
    [dead] = mesh.topics[T.dlq_of(T.DOCS_CHUNKED)]
    assert H.header_dict(dead.headers)[H.DLT_FAILURE_CLASS] == b"poison"


async def test_transient_model_failures_are_retried() -> None:
    fake = FakeEmbedder()
    fake.transient_failures = 2  # the batch call, then the first single retry
    mesh = mesh_with(fake, batch_size=4)
    await mesh.publish(document("d1", ["some text"]), as_="ingest")
    await mesh.run_until_idle()
    assert len(fake.calls) == 3
    assert [e.doc_id for e in mesh.events(T.DOCS_EMBEDDED)] == ["d1"]


async def test_queries_for_the_retrieve_stage_are_embedded_in_one_call() -> None:
    fake = FakeEmbedder()
    mesh = mesh_with(fake, batch_size=8)
    requests = [routed("r1", "What do beta cells make?"), routed("r2", "Why is the sky blue?")]
    for r in requests:
        await mesh.publish(r, as_="route", next_stage="retrieve")
    skipped = routed("r3", "not for us")
    await mesh.publish(skipped, as_="route", next_stage="infer")
    await mesh.run_until_idle()

    assert fake.calls == [["What do beta cells make?", "Why is the sky blue?"]]
    assert isinstance(mesh.outcomes[-1][2], Skipped)
    out = mesh.events(T.REQUESTS_EMBEDDED)
    records = mesh.topics[T.REQUESTS_EMBEDDED]
    assert len(out) == 2
    for r, e, rec in zip(requests, out, records, strict=True):
        assert isinstance(e, QueryEmbedded)
        assert e.event_id == derived_event_id(r.event_id, "embed", 0)
        assert (e.request_id, e.tenant) == (r.request_id, "acme")
        assert e.slip == r.slip and e.query == r.query and e.route == r.route
        assert e.embed_model == "fake-embed@r1" and e.versions["embed_model"] == "fake-embed@r1"
        assert e.dim == DIM and np.allclose(e.dense, fake_vector(r.query.prompt), atol=1e-6)
        q = query_vector(r.query.prompt)
        assert e.sparse.indices == q.indices and e.sparse.values == [1.0] * len(q.indices)
        # the model call's share of the stage (model time, told apart from mesh overhead)
        assert 0 < e.stage_latency_ms["embed.model"] <= e.stage_latency_ms["embed"]
        # embedding is the first half of the retrieve stage: the index takes it from here
        assert H.header_dict(rec.headers)[H.NEXT] == b"retrieve"


async def test_a_cached_query_records_no_model_time() -> None:
    fake = FakeEmbedder()
    mesh = mesh_with(fake, batch_size=8, cache=MemoryEmbeddingCache())
    for request_id in ("r1", "r2"):
        await mesh.publish(routed(request_id, "Why is the sky blue?"), as_="route")
        await mesh.run_until_idle()
    first, second = mesh.events(T.REQUESTS_EMBEDDED)
    assert len(fake.calls) == 1  # the second query came from the cache
    assert first.stage_latency_ms["embed.model"] > 0
    assert second.stage_latency_ms["embed.model"] == 0.0 < second.stage_latency_ms["embed"]


async def test_batch_size_one_handles_records_one_by_one() -> None:
    fake = FakeEmbedder()
    mesh = mesh_with(fake, batch_size=1)
    for i in range(3):
        await mesh.publish(document(f"d{i}", [f"t{i}"]), as_="ingest")
    await mesh.run_until_idle()
    assert fake.calls == [["t0"], ["t1"], ["t2"]]
    assert len(mesh.events(T.DOCS_EMBEDDED)) == 3


def test_a_reindex_instance_has_its_own_group_and_model() -> None:
    s = settings()
    svc = build_service(s, group="embed@other-model")
    assert svc.group == "embed@other-model" and svc.identity == "embed"
    assert svc.topics == [T.DOCS_CHUNKED, T.REQUESTS_ROUTED]
    sub = svc.subscriptions[T.DOCS_CHUNKED]
    assert sub.batch_size == 4 and sub.batch_wait_ms == 5
    assert svc.subscriptions[T.REQUESTS_ROUTED].stage == "retrieve"


@pytest.mark.parametrize(("title", "text", "expected"), [("T", "body", "T\nbody"), ("", "b", "b")])
def test_chunk_text_prefixes_the_title_once(title: str, text: str, expected: str) -> None:
    assert chunk_text(chunk("d", 0, text, title)) == expected
    assert chunk_text(chunk("d", 0, f"{title} {text}", title)) == f"{title} {text}"


# -- the remote embedder's error mapping (httpx's in-process transport: no sockets) --------


def remote(handler: Callable[[httpx.Request], httpx.Response], **kw: Any) -> OpenAIEmbedder:
    client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    return OpenAIEmbedder(
        "http://embed.test/v1",
        "m",
        revision="r",
        client=client,
        breaker=CircuitBreaker("unit-remote", recovery_s=60),
        backoff=Backoff(0.0, 0.0),
        **kw,
    )


def ok(request: httpx.Request) -> httpx.Response:
    texts = json.loads(request.content)["input"]
    data = [{"index": i, "embedding": [float(len(t)), 1.0]} for i, t in enumerate(texts)]
    return httpx.Response(200, json={"data": data[::-1]})


async def test_remote_vectors_are_normalised_in_input_order_and_split_per_request() -> None:
    seen: list[list[str]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url == "http://embed.test/v1/embeddings"
        seen.append(json.loads(request.content)["input"])
        return ok(request)

    e = remote(handler, max_inputs=2)
    vectors = await e.embed(["a", "bbb", "cc"])
    assert sorted(map(len, seen)) == [1, 2]
    expected = np.array([[1, 1], [3, 1], [2, 1]], dtype=np.float32)
    assert np.allclose(vectors, expected / np.linalg.norm(expected, axis=1, keepdims=True))
    assert model_stamp(e) == "m@r"


async def test_remote_4xx_is_poison_and_does_not_count_against_the_endpoint() -> None:
    e = remote(lambda _: httpx.Response(400, text="input too long"))
    for _ in range(5):
        with pytest.raises(Poison, match="input too long"):
            await e.embed(["x"])
    assert e.breaker.state is BreakerState.CLOSED


async def test_remote_429_is_transient_with_retry_after_and_never_opens_the_breaker() -> None:
    e = remote(lambda _: httpx.Response(429, headers={"Retry-After": "7"}))
    for _ in range(5):
        with pytest.raises(Transient) as raised:
            await e.embed(["x"])
        assert raised.value.retry_after == 7.0
    assert e.breaker.state is BreakerState.CLOSED


async def test_remote_5xx_is_retried_once_then_transient_and_opens_the_breaker() -> None:
    calls = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        return httpx.Response(503)

    e = remote(handler)
    with pytest.raises(Transient):
        await e.embed(["x"])
    assert calls == 2  # the call and its one retry
    with pytest.raises(Transient):
        await e.embed(["x"])  # third consecutive failure opens it; the retry is refused
    assert calls == 3 and e.breaker.state is BreakerState.OPEN
    with pytest.raises(CircuitOpen) as raised:
        await e.embed(["x"])
    assert calls == 3 and 59 < (raised.value.retry_after or 0) <= 60


async def test_remote_malformed_answers_and_timeouts_are_transient() -> None:
    e = remote(lambda _: httpx.Response(200, json={"data": [{"index": 0}]}))
    with pytest.raises(Transient, match="malformed"):
        await e.embed(["x"])

    def hang(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("slow", request=request)

    with pytest.raises(Transient, match="timed out"):
        await remote(hang).embed(["x"])


def test_make_embedder_picks_remote_local_or_refuses() -> None:
    remote_settings = Settings(embed={"endpoint": "http://tei:8080", "model": "bge"})  # type: ignore[arg-type]
    e = make_embedder(remote_settings)
    assert isinstance(e, OpenAIEmbedder) and e.url == "http://tei:8080/v1/embeddings"
    assert e.revision == "unpinned"
    local = make_embedder(Settings())
    assert isinstance(local, LocalEmbedder) and local.model_id == DEFAULT_MODEL
    assert local.revision.startswith("0.1.0+")  # package version + hash of its files
    with pytest.raises(ConfigError, match="neither"):
        make_embedder(Settings(embed={"model": "no/such-model"}))  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="REVISION"):
        make_embedder(Settings(embed={"revision": "0.0.0+000000000000"}))  # type: ignore[arg-type]
