"""The index service: ``docs.embedded`` → ``docs.indexed``; ``requests.embedded`` →
``requests.retrieved``.

The vector store is opened when the service starts (Qdrant server when STRATA_QDRANT_URL
is set, else the embedded engine of ``settings.index.engine``) and closed when it stops.
For the in-memory harness, :meth:`IndexService.bind` attaches settings and a store without
starting a consumer.
"""

from __future__ import annotations

import time
from typing import Any, Final

import structlog

from stratamesh.bus import topics
from stratamesh.bus.envelope import now_ms
from stratamesh.bus.middleware import Context
from stratamesh.bus.service import Service
from stratamesh.config import IndexSettings, Settings
from stratamesh.errors import ConfigError, Poison, StrataError
from stratamesh.events import (
    ChunksEmbedded,
    ChunksIndexed,
    ContextRetrieved,
    QueryEmbedded,
    RetrievalPlan,
)
from stratamesh.models.rerankers import Reranker, make_reranker
from stratamesh.stores.vectors import SparseVec, VectorStore, open_vector_store

from .catalog import Catalog
from .filters import InvalidFilter, search_filter
from .indexing import index_events, source_ms
from .metrics import index_metrics
from .search import Mode, Ranked, citations, rerank, search_chunks

__all__ = ["INDEX_LAG", "IndexService", "service"]

log = structlog.get_logger("stratamesh.index")

STAGE_LATENCY_KEY: Final = "retrieve"
RERANK_VERSION_KEY: Final = "reranker"
# docs.embedded micro-batches: one upsert per batch (up to this many events / this long).
UPSERT_BATCH: Final = 64
UPSERT_BATCH_WAIT_MS: Final = 20

INDEX_LAG = index_metrics().lag_seconds


def _plan_value(plan: RetrievalPlan, name: str, index_default: int) -> int:
    """A plan field left at its schema default defers to the index's setting."""
    value = int(getattr(plan, name))
    return index_default if value == RetrievalPlan.model_fields[name].default else value


class IndexService(Service):
    def __init__(self, name: str = "index", **kw: Any) -> None:
        super().__init__(name, **kw)
        self.store: VectorStore | None = None
        self.catalog: Catalog | None = None
        self.index_settings = IndexSettings()
        self.reranker: Reranker | None = None
        self._owns_store = False
        self.subscribe(
            topics.DOCS_EMBEDDED, batch_size=UPSERT_BATCH, batch_wait_ms=UPSERT_BATCH_WAIT_MS
        )(self.on_embedded)
        self.subscribe(topics.REQUESTS_EMBEDDED, stage=topics.Stage.RETRIEVE)(self.on_query)
        # Hooks, not overrides: a variant (`strata run index --identity ...`) keeps them.
        self.on_bind(self._bind_once)
        self.on_stop(self._close)

    def bind(self, settings: Settings, store: VectorStore | None = None) -> VectorStore:
        """Attach the vector store (opened from ``settings`` unless given)."""
        self.index_settings = settings.index
        if self.reranker is None:
            self.reranker = make_reranker(settings)
        if store is None:
            store = open_vector_store(settings)
            self._owns_store = True
        self.store = store
        self.catalog = Catalog(store, settings.index.collection_prefix)
        return store

    def _bind_once(self, settings: Settings) -> None:
        if self.store is None:
            self.bind(settings)

    async def _close(self) -> None:
        if self.reranker is not None:
            await self.reranker.aclose()
            self.reranker = None
        if self.store is not None and self._owns_store:
            await self.store.close()
            self.store = self.catalog = None
            self._owns_store = False

    def _ready(self) -> tuple[VectorStore, Catalog]:
        if self.store is None or self.catalog is None:
            raise ConfigError("the index service has no vector store: call bind() or start()")
        return self.store, self.catalog

    # -- knowledge plane --------------------------------------------------------------

    async def on_embedded(self, items: list[tuple[ChunksEmbedded, Context]]) -> None:
        store, catalog = self._ready()
        results = await index_events(store, catalog, [(ev, ctx.tenant) for ev, ctx in items])
        done = now_ms()
        live = await catalog.live()
        for (ev, ctx), res in zip(items, results, strict=True):
            lag_ms = max(0.0, float(done - source_ms(ev)))
            if res.collection == live and not ctx.is_replay:
                INDEX_LAG.observe(lag_ms / 1000.0)
            ctx.publish(
                ChunksIndexed.derive(
                    ev,
                    stage=ctx.service,
                    producer=ctx.service,
                    tenant=ctx.tenant,
                    collection=res.collection,
                    count=len(res.chunk_ids),
                    index_lag_ms=lag_ms,
                    embed_model=ev.embed_model,
                    chunk_ids=res.chunk_ids,
                    superseded_version=res.superseded_version,
                )
            )

    # -- request plane ----------------------------------------------------------------

    async def on_query(self, event: QueryEmbedded, ctx: Context) -> None:
        store, catalog = self._ready()
        started = time.perf_counter()
        tenant = ctx.tenant
        if not tenant:
            raise Poison("QueryEmbedded without an authenticated tenant")
        plan = event.route.retrieval
        cfg = self.index_settings
        collection = await catalog.for_query(event.embed_model, plan.collection)
        versions = dict(event.versions)
        ranked = []
        if collection is not None and plan.enabled and (plan.dense or plan.sparse):
            try:
                flt = search_filter(tenant, event.query, plan, now_ms())
            except InvalidFilter as exc:
                log.warning("retrieval filter refused", reason=str(exc))
            else:
                await catalog.ensure_metadata_indexes(collection, sorted(flt.metadata))
                mode: Mode = (
                    "hybrid" if plan.dense and plan.sparse else "dense" if plan.dense else "sparse"
                )
                top_k = _plan_value(plan, "top_k", cfg.top_k)
                reranker = self.reranker if plan.rerank else None
                candidates = (
                    max(top_k, _plan_value(plan, "rerank_top_n", cfg.rerank_candidates))
                    if reranker is not None
                    else top_k
                )
                ranked = await search_chunks(
                    store,
                    collection,
                    flt,
                    dense=event.dense,
                    sparse=SparseVec(event.sparse.indices, event.sparse.values),
                    top_k=candidates,
                    prefetch_limit=_plan_value(plan, "prefetch_k", cfg.prefetch_limit),
                    rrf_k=_plan_value(plan, "rrf_k", cfg.rrf_k),
                    mode=mode,
                )
                if plan.rerank:
                    ranked = await self._rerank(reranker, event, ranked, top_k, versions)
        elif collection is None:
            log.warning("no collection for the query's embedding model", model=event.embed_model)
        slip = event.slip.advanced()
        latency = dict(event.stage_latency_ms)
        latency[STAGE_LATENCY_KEY] = (time.perf_counter() - started) * 1000.0
        ctx.publish(
            ContextRetrieved.derive(
                event,
                stage=ctx.service,
                producer=ctx.service,
                tenant=tenant,
                slip=slip,
                stage_latency_ms=latency,
                versions=versions,
                context=citations(ranked),
                collection=collection or "",
                embed_model=event.embed_model,
            ),
            next_stage=slip.next_stage,
        )

    async def _rerank(
        self,
        reranker: Reranker | None,
        event: QueryEmbedded,
        ranked: list[Ranked],
        top_k: int,
        versions: dict[str, str],
    ) -> list[Ranked]:
        """Rerank, or keep the fused order and say why in ``versions["rerank"]``: retrieval
        degrades rather than fails when the reranker is missing, open or refusing."""
        if reranker is None:
            versions[RERANK_VERSION_KEY] = "skipped: no reranker configured"
            return ranked[:top_k]
        try:
            out = await rerank(reranker, event.query.prompt, ranked, top_k)
        except StrataError as exc:
            log.warning("rerank skipped", reason=str(exc), reranker=reranker.model_id)
            versions[RERANK_VERSION_KEY] = f"skipped: {type(exc).__name__}"
            return ranked[:top_k]
        versions[RERANK_VERSION_KEY] = reranker.model_id
        return out


service = IndexService()
