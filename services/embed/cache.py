"""Embedding cache: dense vectors by (model stamp, text hash), in Redis when configured.

Key: ``strata:emb:<model id@revision>:<BLAKE2b-128 of the text, hex>`` → the vector as
little-endian float32 bytes, with ``STRATA_EMBED__CACHE_TTL_S``.  The stamp in the key keeps
models (and revisions) apart, so a re-index with another model never reads these vectors.
Sparse vectors are not cached: computing one costs less than a round trip.

The cache is an optimisation: when Redis fails, lookups are misses and writes are dropped
(logged once per outage), and the model is called as if there were no cache.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Final, Protocol

import numpy as np
import redis.asyncio as aioredis
import structlog
from redis.exceptions import RedisError

from stratamesh.models.embedders import Vectors

__all__ = ["EMBED_CACHE", "EmbeddingCache", "MemoryEmbeddingCache", "RedisEmbeddingCache"]

log = structlog.get_logger("stratamesh.services.embed")

EMBED_CACHE: Final = "strata:emb:"
"""Redis key prefix of cached embeddings (see the module doc)."""


def text_key(stamp: str, text: str) -> str:
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()
    return f"{EMBED_CACHE}{stamp}:{digest}"


class EmbeddingCache(Protocol):
    async def get_many(self, stamp: str, texts: Sequence[str]) -> list[bytes | None]:
        """The cached float32 bytes of each text (None: a miss)."""
        ...

    async def put_many(self, stamp: str, texts: Sequence[str], vectors: Vectors) -> None: ...

    async def close(self) -> None: ...


def encode_vector(vector: Vectors) -> bytes:
    return np.asarray(vector, dtype="<f4").tobytes()


def decode_vector(raw: bytes, dim: int | None) -> Vectors | None:
    """The vector in ``raw``, or None when it does not have ``dim`` floats (when known)."""
    if len(raw) % 4 or not raw or (dim is not None and len(raw) != 4 * dim):
        return None
    return np.frombuffer(raw, dtype="<f4").astype(np.float32)


class RedisEmbeddingCache:
    def __init__(self, url: str, ttl_s: int) -> None:
        self._redis = aioredis.Redis.from_url(url)
        self._ttl = ttl_s
        self._failing = False

    def _failed(self, op: str, exc: Exception) -> None:
        if not self._failing:
            log.warning("embedding cache unavailable, going on without it", op=op, error=repr(exc))
        self._failing = True

    async def get_many(self, stamp: str, texts: Sequence[str]) -> list[bytes | None]:
        if not texts:
            return []
        try:
            values = await self._redis.mget([text_key(stamp, t) for t in texts])
        except (RedisError, OSError) as exc:
            self._failed("get", exc)
            return [None] * len(texts)
        self._failing = False
        return [v if isinstance(v, bytes) else None for v in values]

    async def put_many(self, stamp: str, texts: Sequence[str], vectors: Vectors) -> None:
        if not texts:
            return
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for text, vector in zip(texts, vectors, strict=True):
                    pipe.set(text_key(stamp, text), encode_vector(vector), ex=self._ttl)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            self._failed("set", exc)

    async def close(self) -> None:
        await self._redis.aclose()


class MemoryEmbeddingCache:
    """A dict, for tests and single-process tools."""

    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}

    async def get_many(self, stamp: str, texts: Sequence[str]) -> list[bytes | None]:
        return [self.data.get(text_key(stamp, t)) for t in texts]

    async def put_many(self, stamp: str, texts: Sequence[str], vectors: Vectors) -> None:
        for text, vector in zip(texts, vectors, strict=True):
            self.data[text_key(stamp, text)] = encode_vector(vector)

    async def close(self) -> None:
        return None
