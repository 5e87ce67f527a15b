"""Dense + sparse vectors for the texts of one micro-batch, with one model call.

The runtime hands the embed handlers up to ``STRATA_EMBED__BATCH_SIZE`` records of a
partition at a time; the handlers pool every text of those records and call
:meth:`Vectoriser.vectorise` once.  Duplicate texts in a batch are embedded once, texts
found in the cache are not embedded at all, and the rest go to the model in a single call
that runs in a worker thread (local model) or over HTTP (remote), so the event loop keeps
fetching, acknowledging and committing meanwhile.  Sparse vectors are computed on the loop
while the model works.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import structlog

from stratamesh.config import Settings
from stratamesh.models.embedders import Embedder, Vectors, make_embedder, model_stamp
from stratamesh.models.sparse import SparseVec, document_vector, query_vector

from .cache import EmbeddingCache, RedisEmbeddingCache, decode_vector
from .metrics import embed_metrics

__all__ = ["Vectorised", "Vectoriser"]

log = structlog.get_logger("stratamesh.services.embed")


@dataclass(slots=True)
class Vectorised:
    """Vectors of a batch of texts, in input order."""

    stamp: str  # model id@revision
    dim: int
    dense: Vectors  # (n, dim) float32, normalised
    sparse: list[SparseVec]
    model_seconds: float
    cache_hits: int


class Vectoriser:
    """Owns the embedder and the cache of one embed service instance (both made lazily)."""

    def __init__(
        self,
        settings: Settings,
        *,
        embedder: Embedder | None = None,
        cache: EmbeddingCache | None = None,
    ) -> None:
        self.settings = settings
        self._embedder = embedder
        self._cache = cache
        self._cache_opened = cache is not None
        self._own_cache = False
        self._dim: int | None = None
        self.model_calls = 0

    def bind(self, settings: Settings) -> None:
        """Adopt the settings the service is started with (cache URL, model if not made)."""
        if self._embedder is None:
            self.settings = settings
        if not self._cache_opened:
            self.settings = self.settings.model_copy(update={"redis_url": settings.redis_url})

    @property
    def embedder(self) -> Embedder:
        if self._embedder is None:
            self._embedder = make_embedder(self.settings)
            log.info("embedder ready", model=model_stamp(self._embedder))
        return self._embedder

    async def warm(self) -> None:
        """Make the embedder and load its model now (in a worker thread), if it has one."""
        load = getattr(self.embedder, "load", None)
        if callable(load):
            await asyncio.to_thread(load)

    @property
    def stamp(self) -> str:
        return model_stamp(self.embedder)

    @property
    def cache(self) -> EmbeddingCache | None:
        if not self._cache_opened:
            self._cache_opened = True
            if self.settings.redis_url:
                self._cache = RedisEmbeddingCache(
                    self.settings.redis_url, self.settings.embed.cache_ttl_s
                )
                self._own_cache = True
        return self._cache

    async def vectorise(self, texts: Sequence[str], *, query: bool = False) -> Vectorised:
        """Dense and sparse vectors of ``texts`` (queries: sparse weights 1.0 per term)."""
        embedder = self.embedder
        stamp = model_stamp(embedder)
        unique = list(dict.fromkeys(texts))
        dense_task = asyncio.create_task(self._dense(embedder, stamp, unique))
        try:
            make_sparse = query_vector if query else document_vector
            sparse = [make_sparse(t) for t in texts]
        finally:
            rows, seconds, hits = await dense_task
        if unique:
            slot = {t: i for i, t in enumerate(unique)}
            dense = rows[[slot[t] for t in texts]]
            self._dim = int(rows.shape[1])
        else:
            dense = np.zeros((0, self._dim or 0), dtype=np.float32)
        return Vectorised(stamp, self._dim or 0, dense, sparse, seconds, hits)

    async def _dense(
        self, embedder: Embedder, stamp: str, texts: list[str]
    ) -> tuple[Vectors, float, int]:
        if not texts:
            return np.zeros((0, 0), dtype=np.float32), 0.0, 0
        m = embed_metrics()
        cache = self.cache
        found: list[Vectors | None] = [None] * len(texts)
        if cache is not None:
            for i, raw in enumerate(await cache.get_many(stamp, texts)):
                if raw is not None:
                    found[i] = decode_vector(raw, self._dim)
            if self._dim is None and len({len(v) for v in found if v is not None}) > 1:
                found = [None] * len(texts)  # cannot tell which length is right: embed all
        missing = [i for i, v in enumerate(found) if v is None]
        hits = len(texts) - len(missing)
        m.cache_hits.labels(stamp).inc(hits)
        seconds = 0.0
        if missing:
            started = time.perf_counter()
            fresh = await embedder.embed([texts[i] for i in missing])
            seconds = time.perf_counter() - started
            self.model_calls += 1
            m.model_calls.labels(stamp).inc()
            m.model_texts.labels(stamp).inc(len(missing))
            m.model_seconds.labels(stamp).observe(seconds)
            m.batch_texts.labels(stamp).observe(len(missing))
            if fresh.shape[0] != len(missing):
                raise RuntimeError(f"{stamp} returned {fresh.shape[0]} vectors for {len(missing)}")
            for j, i in enumerate(missing):
                found[i] = fresh[j]
            if cache is not None:
                await cache.put_many(stamp, [texts[i] for i in missing], fresh)
        rows = np.stack([v for v in found if v is not None]).astype(np.float32, copy=False)
        if rows.shape[0] != len(texts) or len({len(v) for v in found if v is not None}) != 1:
            raise RuntimeError(f"{stamp}: vectors of different lengths in one batch")
        return rows, seconds, hits

    async def aclose(self) -> None:
        if self._embedder is not None:
            await self._embedder.aclose()
        if self._cache is not None and self._own_cache:
            await self._cache.close()
            self._cache = None
            self._cache_opened = self._own_cache = False
