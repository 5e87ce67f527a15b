"""The embed service: dense + sparse vectors for chunks and for queries.

    docs.chunked     (DocumentChunked)  ─► docs.embedded      (ChunksEmbedded, one per input)
    requests.routed  (RequestRouted, strata-next = retrieve) ─► requests.embedded (QueryEmbedded)

Both subscriptions are batched (``STRATA_EMBED__BATCH_SIZE`` records or
``STRATA_EMBED__BATCH_WAIT_MS``): the texts of every record of a batch go to the model in
one call (:mod:`.vectoriser`).  Every output carries the model stamp ``model@revision`` in
``embed_model`` and ``versions["embed_model"]``, and the sparse vectoriser's id in
``sparse_model`` / ``versions["sparse_model"]``.

Query embedding is the first half of the slip's ``retrieve`` stage (the index does the
second): QueryEmbedded keeps the slip as it is and is addressed to ``retrieve`` again; the
index advances the slip when it publishes ContextRetrieved.

``strata reindex --embed-model NAME`` runs a second instance with another model in its own
consumer group: :func:`build_service` (``group=f"embed@{NAME}"``).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from stratamesh.bus.middleware import Context
from stratamesh.bus.service import Service
from stratamesh.bus.topics import DOCS_CHUNKED, REQUESTS_ROUTED, Stage
from stratamesh.config import Settings
from stratamesh.events import (
    Chunk,
    ChunksEmbedded,
    DocumentChunked,
    EmbeddedChunk,
    QueryEmbedded,
    RequestRouted,
    SparseVector,
)
from stratamesh.models.embedders import Embedder
from stratamesh.models.sparse import SPARSE_MODEL, SparseVec
from stratamesh.resilience.breaker import breaker_metrics

from .cache import EmbeddingCache
from .vectoriser import Vectoriser

__all__ = ["MODEL_LATENCY_KEY", "SERVICE", "build_service", "chunk_text", "query_text", "service"]

SERVICE = "embed"
STAGE_LATENCY_KEY = "embed"
# The embedding model's share of "embed" (the batch's one model call; 0 when every text came
# from the cache): model time, not mesh overhead, for benchmarks that tell the two apart.
MODEL_LATENCY_KEY = "embed.model"


def chunk_text(chunk: Chunk) -> str:
    """What is embedded for a chunk: its document title, then its text."""
    if chunk.title and not chunk.text.startswith(chunk.title):
        return f"{chunk.title}\n{chunk.text}"
    return chunk.text


def query_text(event: RequestRouted) -> str:
    """What is embedded for a request: the (pseudonymised) prompt, else its last user turn."""
    if event.query.prompt.strip():
        return event.query.prompt
    users = [m.content for m in event.query.messages if m.role == "user"]
    return users[-1] if users else ""


def _sparse(vec: SparseVec) -> SparseVector:
    return SparseVector(indices=vec.indices, values=vec.values)


def build_service(
    settings: Settings,
    *,
    group: str | None = None,
    identity: str | None = None,
    embedder: Embedder | None = None,
    cache: EmbeddingCache | None = None,
) -> Service:
    """An embed service for ``settings.embed`` in consumer group ``group`` (default: the
    identity).  The model loads when the service starts (or on first use in the in-memory
    harness).  ``embedder`` / ``cache`` replace the ones the settings describe (tests, tools).

    Output ids are derived from the input id and the *identity* (``ctx.derive_id``): a
    re-index instance that keeps the identity ``embed`` emits the same event ids as the live
    one for the same chunks — fine while every index consumer group handles one model; give
    it ``identity=f"embed.{name}"`` (any ``embed.*`` identity may produce ``docs.embedded``;
    it needs its own key) when both kinds must be told apart by id."""
    vectoriser = Vectoriser(settings, embedder=embedder, cache=cache)
    svc = Service(SERVICE, group=group, identity=identity)
    # The vectoriser adopts the settings the service runs with (Redis URL); the model loads
    # before the consumer takes partitions.
    svc.on_bind(vectoriser.bind)

    @svc.on_start
    async def warm(settings: Settings) -> None:
        vectoriser.bind(settings)
        await vectoriser.warm()

    svc.on_stop(vectoriser.aclose)
    size, wait_ms = settings.embed.batch_size, settings.embed.batch_wait_ms
    breaker_metrics()

    async def on_chunked(items: list[tuple[DocumentChunked, Context]]) -> None:
        texts = [chunk_text(c) for event, _ in items for c in event.chunks]
        v = await vectoriser.vectorise(texts)
        now = datetime.now(UTC)
        at = 0
        for event, ctx in items:
            embedded = []
            for chunk in event.chunks:
                embedded.append(
                    EmbeddedChunk(
                        chunk=chunk, dense=v.dense[at].tolist(), sparse=_sparse(v.sparse[at])
                    )
                )
                at += 1
            ctx.publish(
                ChunksEmbedded(
                    event_id=ctx.derive_id(),
                    tenant=ctx.tenant,
                    occurred_at=now,
                    producer=ctx.service,
                    unsigned_ingress=event.unsigned_ingress,
                    versions={
                        **event.versions,
                        "embed_model": v.stamp,
                        "sparse_model": SPARSE_MODEL,
                    },
                    doc_id=event.doc_id,
                    doc_version=event.doc_version,
                    embed_model=v.stamp,
                    dim=v.dim,
                    sparse_model=SPARSE_MODEL,
                    embeddings=embedded,
                )
            )

    async def on_routed(items: list[tuple[RequestRouted, Context]]) -> None:
        started = time.perf_counter()
        v = await vectoriser.vectorise([query_text(e) for e, _ in items], query=True)
        elapsed_ms = (time.perf_counter() - started) * 1000
        model_ms = v.model_seconds * 1000
        now = datetime.now(UTC)
        for i, (event, ctx) in enumerate(items):
            latency = dict(event.stage_latency_ms)
            latency[STAGE_LATENCY_KEY] = latency.get(STAGE_LATENCY_KEY, 0.0) + elapsed_ms
            latency[MODEL_LATENCY_KEY] = latency.get(MODEL_LATENCY_KEY, 0.0) + model_ms
            out = QueryEmbedded.derive(
                event,
                stage=ctx.service,
                producer=ctx.service,
                occurred_at=now,
                tenant=ctx.tenant,
                versions={**event.versions, "embed_model": v.stamp, "sparse_model": SPARSE_MODEL},
                stage_latency_ms=latency,
                embed_model=v.stamp,
                dim=v.dim,
                dense=v.dense[i].tolist(),
                sparse=_sparse(v.sparse[i]),
            ).model_copy(update={"event_id": ctx.derive_id()})
            ctx.publish(out, next_stage=event.slip.next_stage or Stage.RETRIEVE)

    _subscribe(svc, DOCS_CHUNKED, on_chunked, None, size, wait_ms)
    _subscribe(svc, REQUESTS_ROUTED, on_routed, Stage.RETRIEVE, size, wait_ms)
    return svc


def _subscribe(
    svc: Service,
    topic_name: str,
    handler: Callable[[list[Any]], Awaitable[None]],
    stage: str | None,
    size: int,
    wait_ms: int,
) -> None:
    if size > 1:
        svc.subscribe(topic_name, stage=stage, batch_size=size, batch_wait_ms=wait_ms)(handler)
        return

    async def one(event: Any, ctx: Context) -> None:  # batch size 1: a one-item batch
        await handler([(event, ctx)])

    svc.subscribe(topic_name, stage=stage)(one)


service = build_service(Settings())
