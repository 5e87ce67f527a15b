"""Route's response cache in Redis: exact-hash and semantic, scoped by tenant, invalidated
when the knowledge an answer cited is superseded.

Keys (prefixes in :mod:`stratamesh.stores.keys`)::

    cache:<tenant>:<digest>        JSON answer, TTL             (exact hit: GET)
    sem:<tenant>:<scope>           hash digest → query vector   (semantic: cosine ≥ threshold)
    sem:<tenant>:<scope>:v         change counter: replicas reload their copy only on change
    cited:<tenant>:<doc id>        set "<version> <digest> <scope>" of answers citing the doc
    docv:<tenant>:<doc id>         newest indexed version (a late fill citing older is dropped)
    pending:<tenant>:<request id>  what to cache when the request's result arrives

The *digest* covers everything the answer depends on: the normalised (pseudonymised) prompt,
task, response format, prior messages, ``as_of`` and the asker's ACL principals (two askers
who may see different documents never share an answer).  The semantic *scope* is the same
minus the prompt; requests with prior messages are not served semantically (the history
changes the meaning of a similar question).

Fill and invalidation are Lua scripts, so an invalidation can never interleave with a fill
of an answer citing the superseded version.  The scripts build the keys of the answers they
drop from prefixes: single Redis (or one cluster slot per tenant with hash tags), not a
spread cluster.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np
import redis.asyncio as aioredis

from stratamesh.events import Citation, Query, RequestCompleted
from stratamesh.models.embedders import Vectors
from stratamesh.stores.keys import (
    ROUTE_CACHE,
    ROUTE_CITED,
    ROUTE_DOC_VERSION,
    ROUTE_PENDING,
    ROUTE_SEMANTIC,
)

__all__ = [
    "CacheHit",
    "CachedAnswer",
    "Pending",
    "ResponseCache",
    "exact_digest",
    "normalise",
    "semantic_scope",
]

NO_SCOPE: Final = "-"
_SPACE = re.compile(r"\s+")
_TRAILING = re.compile(r"[\s?!.。？！]+$")

# KEYS: entry, semhash, semver, then (cited, docv) per citation.
# ARGV: json, ttl_s, digest, scope, vector ("" = none), max_entries, then one version per
# citation.  Returns 1 when cached, 0 when a cited version is already superseded.
_FILL: Final = """
local n = (#KEYS - 3) / 2
for i = 1, n do
  local latest = tonumber(redis.call('GET', KEYS[3 + 2 * i]) or '0')
  if latest > tonumber(ARGV[6 + i]) then return 0 end
end
local ttl = tonumber(ARGV[2])
redis.call('SET', KEYS[1], ARGV[1], 'EX', ttl)
for i = 1, n do
  local cited = KEYS[2 + 2 * i]
  redis.call('SADD', cited, ARGV[6 + i] .. ' ' .. ARGV[3] .. ' ' .. ARGV[4])
  if redis.call('TTL', cited) < ttl then redis.call('EXPIRE', cited, ttl) end
end
if ARGV[5] ~= '' then
  redis.call('HSET', KEYS[2], ARGV[3], ARGV[5])
  local extra = redis.call('HLEN', KEYS[2]) - tonumber(ARGV[6])
  if extra > 0 then
    -- extra + 1 distinct fields hold at least `extra` besides the one just written.
    local victims = redis.call('HRANDFIELD', KEYS[2], extra + 1)
    for _, v in ipairs(victims) do
      if extra > 0 and v ~= ARGV[3] then
        redis.call('HDEL', KEYS[2], v)
        extra = extra - 1
      end
    end
  end
  redis.call('EXPIRE', KEYS[2], ttl)
  redis.call('INCR', KEYS[3])
  redis.call('EXPIRE', KEYS[3], ttl)
end
return 1
"""

# KEYS: cited, docv.  ARGV: version, entry prefix, semantic prefix.
# Records the newest version and drops every answer citing an older one.
_INVALIDATE: Final = """
local version = tonumber(ARGV[1])
local latest = tonumber(redis.call('GET', KEYS[2]) or '0')
if version > latest then redis.call('SET', KEYS[2], ARGV[1], 'EX', 30 * 86400) end
local dropped = 0
for _, m in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local v, digest, scope = string.match(m, '^(%S+) (%S+) (%S+)$')
  if v and tonumber(v) < version then
    redis.call('DEL', ARGV[2] .. digest)
    if scope ~= '-' then
      redis.call('HDEL', ARGV[3] .. scope, digest)
      redis.call('INCR', ARGV[3] .. scope .. ':v')
    end
    redis.call('SREM', KEYS[1], m)
    dropped = dropped + 1
  end
end
return dropped
"""


def normalise(text: str) -> str:
    """Case, width, whitespace and trailing punctuation do not make another question."""
    text = unicodedata.normalize("NFKC", text).casefold()
    return _TRAILING.sub("", _SPACE.sub(" ", text).strip())


def _scope_parts(query: Query) -> list[Any]:
    return [
        query.task,
        query.response_format or "",
        sorted(query.principals),
        int(query.as_of.timestamp() * 1000) if query.as_of else None,
    ]


def exact_digest(prompt: str, query: Query) -> str:
    history = [[m.role.value, normalise(m.content)] for m in query.messages]
    material = json.dumps([normalise(prompt), history, *_scope_parts(query)], sort_keys=True)
    return hashlib.sha256(material.encode()).hexdigest()


def semantic_scope(query: Query) -> str | None:
    """The semantic cache partition of a query; None when it must not be served by meaning."""
    if query.messages:
        return None
    return hashlib.sha256(json.dumps(_scope_parts(query)).encode()).hexdigest()[:24]


@dataclass(frozen=True, slots=True)
class CachedAnswer:
    answer: str
    structured: str | None
    citations: list[Citation]
    source_request_id: str
    model: str | None
    created_ms: int

    def to_json(self) -> str:
        return json.dumps(
            {
                "answer": self.answer,
                "structured": self.structured,
                "citations": [c.model_dump(mode="json") for c in self.citations],
                "source_request_id": self.source_request_id,
                "model": self.model,
                "created_ms": self.created_ms,
            }
        )

    @classmethod
    def from_json(cls, raw: bytes | str) -> CachedAnswer:
        d = json.loads(raw)
        return cls(
            answer=d["answer"],
            structured=d.get("structured"),
            citations=[Citation.model_validate(c) for c in d.get("citations", [])],
            source_request_id=d["source_request_id"],
            model=d.get("model"),
            created_ms=int(d.get("created_ms", 0)),
        )


@dataclass(frozen=True, slots=True)
class CacheHit:
    kind: str  # "exact" | "semantic"
    similarity: float
    entry: CachedAnswer


@dataclass(frozen=True, slots=True)
class Pending:
    digest: str
    scope: str | None
    vector: bytes | None  # float32 little-endian


@dataclass
class _Mirror:
    version: bytes | None
    digests: list[str] = field(default_factory=list)
    matrix: Vectors = field(default_factory=lambda: np.zeros((0, 0), dtype=np.float32))


def _vector_bytes(vector: Vectors) -> bytes:
    v = np.asarray(vector, dtype="<f4").ravel()
    norm = float(np.linalg.norm(v))
    return (v / norm if norm > 0 else v).astype("<f4").tobytes()


class ResponseCache:
    def __init__(
        self,
        redis: aioredis.Redis,
        *,
        ttl_s: int,
        threshold: float,
        max_entries: int,
        pending_ttl_s: int = 300,
    ) -> None:
        self.redis = redis
        self.ttl_s = ttl_s
        self.threshold = threshold
        self.max_entries = max_entries
        self.pending_ttl_s = pending_ttl_s
        self._fill: Any = redis.register_script(_FILL)
        self._invalidate: Any = redis.register_script(_INVALIDATE)
        self._mirrors: dict[str, _Mirror] = {}

    @staticmethod
    def entry_key(tenant: str, digest: str) -> str:
        return f"{ROUTE_CACHE}{tenant}:{digest}"

    @staticmethod
    def semantic_key(tenant: str, scope: str) -> str:
        return f"{ROUTE_SEMANTIC}{tenant}:{scope}"

    # -- lookups ------------------------------------------------------------------------

    async def get_exact(self, tenant: str, digest: str) -> CacheHit | None:
        [hit] = await self.get_exact_many([(tenant, digest)])
        return hit

    async def get_exact_many(self, keys: Sequence[tuple[str, str]]) -> list[CacheHit | None]:
        """Exact hits of ``(tenant, digest)`` pairs, in one round trip."""
        if not keys:
            return []
        raws = await self.redis.mget([self.entry_key(t, d) for t, d in keys])
        return [
            CacheHit("exact", 1.0, CachedAnswer.from_json(raw)) if raw is not None else None
            for raw in raws
        ]

    async def _mirror(self, tenant: str, scope: str) -> _Mirror:
        key = self.semantic_key(tenant, scope)
        version = await self.redis.get(key + ":v")
        mirror = self._mirrors.get(key)
        if mirror is not None and mirror.version == version:
            return mirror
        raw = await self.redis.hgetall(key)
        digests, rows = [], []
        for d, v in raw.items():
            if isinstance(v, bytes) and len(v) % 4 == 0 and v:
                digests.append(d.decode() if isinstance(d, bytes) else d)
                rows.append(np.frombuffer(v, dtype="<f4"))
        dims = {len(r) for r in rows}
        matrix = (
            np.vstack(rows).astype(np.float32)
            if rows and len(dims) == 1
            else np.zeros((0, 0), dtype=np.float32)
        )
        stamp = version if isinstance(version, bytes) else None
        mirror = _Mirror(stamp, digests if matrix.size else [], matrix)
        if len(self._mirrors) > 10_000:
            self._mirrors.clear()
        self._mirrors[key] = mirror
        return mirror

    async def get_semantic(self, tenant: str, scope: str, vector: Vectors) -> CacheHit | None:
        """The cached answer of the most similar earlier question (cosine ≥ threshold)."""
        mirror = await self._mirror(tenant, scope)
        q = np.frombuffer(_vector_bytes(vector), dtype="<f4")
        if not mirror.digests or mirror.matrix.shape[1] != q.shape[0]:
            return None
        sims = mirror.matrix @ q
        best = int(np.argmax(sims))
        similarity = float(sims[best])
        if similarity < self.threshold:
            return None
        digest = mirror.digests[best]
        raw = await self.redis.get(self.entry_key(tenant, digest))
        if raw is None:  # the answer expired before its vector: forget the vector
            key = self.semantic_key(tenant, scope)
            await self.redis.hdel(key, digest)
            await self.redis.incr(key + ":v")
            return None
        return CacheHit("semantic", min(1.0, similarity), CachedAnswer.from_json(raw))

    # -- fill ---------------------------------------------------------------------------

    def _pending_key(self, tenant: str, request_id: str) -> str:
        return f"{ROUTE_PENDING}{tenant}:{request_id}"

    async def remember(
        self,
        tenant: str,
        request_id: str,
        digest: str,
        scope: str | None,
        vector: Vectors | None,
        *,
        deadline_ms: int | None = None,
    ) -> None:
        """Note what to cache when this request's result comes back on ``results``; kept
        until shortly after the request's deadline (else ``pending_ttl_s``): a result that
        late is an ``expired`` one, never cached."""
        await self.remember_many([(tenant, request_id, digest, scope, vector, deadline_ms)])

    async def remember_many(
        self,
        notes: Sequence[tuple[str, str, str, str | None, Vectors | None, int | None]],
    ) -> None:
        """:meth:`remember` of ``(tenant, request id, digest, scope, vector, deadline)``
        tuples in one round trip."""
        if not notes:
            return
        now = time.time_ns() // 1_000_000
        pipe = self.redis.pipeline(transaction=False)
        for tenant, request_id, digest, scope, vector, deadline_ms in notes:
            ttl_ms = self.pending_ttl_s * 1000
            if deadline_ms is not None:
                ttl_ms = max(1_000, min(ttl_ms, deadline_ms - now + 30_000))
            payload = {
                "digest": digest,
                "scope": scope,
                "vector": _vector_bytes(vector).hex() if vector is not None and scope else None,
            }
            pipe.set(self._pending_key(tenant, request_id), json.dumps(payload), px=ttl_ms)
        await pipe.execute()

    async def take_pending(self, tenant: str, request_id: str) -> Pending | None:
        raw = await self.redis.getdel(self._pending_key(tenant, request_id))
        if raw is None:
            return None
        d = json.loads(raw)
        vector = bytes.fromhex(d["vector"]) if d.get("vector") else None
        return Pending(d["digest"], d.get("scope"), vector)

    async def fill(self, tenant: str, result: RequestCompleted) -> bool:
        """Cache an ok answer under the key route noted when it routed the request."""
        pending = await self.take_pending(tenant, result.request_id)
        if pending is None or result.answer is None:
            return False
        entry = CachedAnswer(
            answer=result.answer,
            structured=result.structured,
            citations=list(result.citations),
            source_request_id=result.request_id,
            model=result.model,
            created_ms=time.time_ns() // 1_000_000,
        )
        cited: dict[str, int] = {}
        for c in result.citations:  # one version per document: the oldest cited decides
            cited[c.doc_id] = min(cited.get(c.doc_id, c.doc_version), c.doc_version)
        scope = pending.scope if pending.vector is not None else None
        keys = [
            self.entry_key(tenant, pending.digest),
            self.semantic_key(tenant, scope or NO_SCOPE),
            self.semantic_key(tenant, scope or NO_SCOPE) + ":v",
        ]
        versions = []
        for doc_id, version in sorted(cited.items()):
            keys += [f"{ROUTE_CITED}{tenant}:{doc_id}", f"{ROUTE_DOC_VERSION}{tenant}:{doc_id}"]
            versions.append(str(version))
        done = await self._fill(
            keys=keys,
            args=[
                entry.to_json(),
                self.ttl_s,
                pending.digest,
                scope or NO_SCOPE,
                pending.vector if scope else b"",
                self.max_entries,
                *versions,
            ],
        )
        return bool(int(done))

    async def invalidate(self, tenant: str, doc_id: str, version: int) -> int:
        """Drop the answers of ``tenant`` that cited ``doc_id`` below ``version``."""
        dropped = await self._invalidate(
            keys=[f"{ROUTE_CITED}{tenant}:{doc_id}", f"{ROUTE_DOC_VERSION}{tenant}:{doc_id}"],
            args=[version, f"{ROUTE_CACHE}{tenant}:", f"{ROUTE_SEMANTIC}{tenant}:"],
        )
        return int(dropped)
