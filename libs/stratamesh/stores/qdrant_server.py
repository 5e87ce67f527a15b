"""Qdrant through qdrant-client: a server (``STRATA_QDRANT_URL``), or its local mode.

On a server, aliases are Qdrant's own (swapped atomically in one request) and the previous
target of the live alias is kept in the new target's collection metadata, so every index
replica and ``strata reindex`` on any host see the same state.  Local mode (pure Python,
``path=`` or in memory) gets its aliases from a :class:`FileAliasBook`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

from qdrant_client import AsyncQdrantClient
from qdrant_client import models as qm

from stratamesh.config import Settings
from stratamesh.errors import ConfigError
from stratamesh.stores.vectors import (
    DENSE,
    F_SUPERSEDED,
    F_SUPERSEDED_AT,
    F_SUPERSEDED_BY,
    F_TENANT,
    F_VALID_FROM,
    F_VERSION,
    FIELD_INDEXES,
    SPARSE,
    AliasBook,
    ChunkPoint,
    CollectionInfo,
    DocVersion,
    Engine,
    FAny,
    FBool,
    FEmpty,
    FMatch,
    FNode,
    FRange,
    Hit,
    SearchSpec,
    doc_filter_tree,
    search_filter_tree,
    summarize_versions,
)

__all__ = ["QdrantClientStore", "ServerAliasBook", "client_filter", "server_client"]

_UPSERT_BATCH = 256
_SCROLL_PAGE = 1024
_META_MODEL: Final = "strata_embed_model"
_META_DIM: Final = "strata_dim"
_META_PREVIOUS: Final = "strata_previous"


def server_client(settings: Settings) -> AsyncQdrantClient:
    if not settings.qdrant_url:
        raise ConfigError("STRATA_QDRANT_URL is not set")
    return AsyncQdrantClient(url=settings.qdrant_url, timeout=30)


def client_filter(node: FBool) -> qm.Filter:
    return qm.Filter(
        must=[_cond(n) for n in node.must] or None,
        should=[_cond(n) for n in node.should] or None,
        must_not=[_cond(n) for n in node.must_not] or None,
    )


def _cond(node: FNode) -> Any:
    if isinstance(node, FMatch):
        return qm.FieldCondition(key=node.key, match=qm.MatchValue(value=node.value))
    if isinstance(node, FAny):
        return qm.FieldCondition(key=node.key, match=qm.MatchAny(any=list(node.values)))
    if isinstance(node, FRange):
        return qm.FieldCondition(
            key=node.key, range=qm.Range(gt=node.gt, gte=node.gte, lt=node.lt, lte=node.lte)
        )
    if isinstance(node, FEmpty):
        return qm.IsEmptyCondition(is_empty=qm.PayloadField(key=node.key))
    return client_filter(node)


def _index_schema(kind: str) -> Any:
    if kind == "tenant":
        return qm.KeywordIndexParams(type=qm.KeywordIndexType.KEYWORD, is_tenant=True)
    if kind == "keyword":
        return qm.PayloadSchemaType.KEYWORD
    if kind == "integer":
        return qm.IntegerIndexParams(type=qm.IntegerIndexType.INTEGER, lookup=True, range=True)
    return qm.PayloadSchemaType.BOOL


def _hit(p: Any) -> Hit:
    return Hit(str(p.id), float(p.score), dict(p.payload or {}))


class ServerAliasBook:
    """Qdrant's aliases; the previous target in the current target's metadata."""

    def __init__(self, client: AsyncQdrantClient) -> None:
        self.client = client

    async def get(self, alias: str) -> str | None:
        for a in (await self.client.get_aliases()).aliases:
            if a.alias_name == alias:
                return str(a.collection_name)
        return None

    async def previous(self, alias: str) -> str | None:
        current = await self.get(alias)
        if current is None:
            return None
        meta = (await self.client.get_collection(current)).config.metadata or {}
        prev = meta.get(_META_PREVIOUS)
        return str(prev) if prev else None

    async def swap(self, alias: str, collection: str) -> str | None:
        old = await self.get(alias)
        if old == collection:
            return old
        ops: list[Any] = []
        if old is not None:
            ops.append(qm.DeleteAliasOperation(delete_alias=qm.DeleteAlias(alias_name=alias)))
        ops.append(
            qm.CreateAliasOperation(
                create_alias=qm.CreateAlias(collection_name=collection, alias_name=alias)
            )
        )
        await self.client.update_collection_aliases(change_aliases_operations=ops)
        await self.client.update_collection(collection, metadata={_META_PREVIOUS: old})
        return old


class QdrantClientStore:
    def __init__(self, client: AsyncQdrantClient, engine: Engine, aliases: AliasBook) -> None:
        self.client = client
        self.engine = engine
        self.aliases = aliases

    @classmethod
    def server(cls, settings: Settings) -> QdrantClientStore:
        client = server_client(settings)
        return cls(client, "server", ServerAliasBook(client))

    @classmethod
    def local(cls, path: Path | None, *, aliases: AliasBook) -> QdrantClientStore:
        if path is None:
            client = AsyncQdrantClient(location=":memory:")
        else:
            path.mkdir(parents=True, exist_ok=True)
            client = AsyncQdrantClient(path=str(path))
        return cls(client, "local", aliases)

    # -- collections ------------------------------------------------------------------

    async def ensure_collection(self, name: str, *, dim: int, embed_model: str) -> bool:
        if await self.client.collection_exists(name):
            info = await self.collection_info(name)
            if info is not None and info.dim != dim:
                raise ConfigError(f"collection {name!r} holds {info.dim}-d vectors, got {dim}-d")
            return False
        await self.client.create_collection(
            name,
            vectors_config={DENSE: qm.VectorParams(size=dim, distance=qm.Distance.COSINE)},
            sparse_vectors_config={SPARSE: qm.SparseVectorParams(modifier=qm.Modifier.IDF)},
            metadata={_META_MODEL: embed_model, _META_DIM: dim},
        )
        if self.engine == "server":  # local mode has no payload indexes (it scans)
            for field_name, kind in FIELD_INDEXES.items():
                await self.client.create_payload_index(
                    name, field_name=field_name, field_schema=_index_schema(kind)
                )
        return True

    async def collection_info(self, name: str) -> CollectionInfo | None:
        if not await self.client.collection_exists(name):
            return None
        info = await self.client.get_collection(name)
        meta = info.config.metadata or {}
        vectors = info.config.params.vectors
        dim = int(meta.get(_META_DIM, 0))
        if not dim and isinstance(vectors, dict) and DENSE in vectors:
            dim = int(vectors[DENSE].size)
        points = int((await self.client.count(name, exact=True)).count)
        return CollectionInfo(name, str(meta.get(_META_MODEL, "")), dim, points)

    async def list_collections(self) -> list[str]:
        return sorted(c.name for c in (await self.client.get_collections()).collections)

    async def drop_collection(self, name: str) -> None:
        await self.client.delete_collection(name)

    async def ensure_keyword_index(self, collection: str, field_name: str) -> None:
        if self.engine != "server":
            return  # local mode scans; it has no payload indexes
        info = await self.client.get_collection(collection)
        if field_name in (info.payload_schema or {}):
            return
        await self.client.create_payload_index(
            collection, field_name=field_name, field_schema=qm.PayloadSchemaType.KEYWORD
        )

    # -- points -----------------------------------------------------------------------

    async def upsert(self, collection: str, points: Sequence[ChunkPoint]) -> None:
        for i in range(0, len(points), _UPSERT_BATCH):
            batch = [
                qm.PointStruct(
                    id=p.id,
                    vector={
                        DENSE: list(p.dense),
                        SPARSE: qm.SparseVector(
                            indices=list(p.sparse.indices), values=list(p.sparse.values)
                        ),
                    },
                    payload=p.payload,
                )
                for p in points[i : i + _UPSERT_BATCH]
            ]
            await self.client.upsert(collection, points=batch, wait=True)

    async def doc_versions(self, collection: str, tenant: str, doc_id: str) -> list[DocVersion]:
        flt = client_filter(doc_filter_tree(tenant, doc_id))
        payloads: list[dict[str, Any]] = []
        offset: Any = None
        while True:
            records, offset = await self.client.scroll(
                collection,
                scroll_filter=flt,
                limit=_SCROLL_PAGE,
                offset=offset,
                with_payload=[F_VERSION, F_VALID_FROM, F_SUPERSEDED, F_SUPERSEDED_AT],
            )
            payloads.extend(dict(r.payload or {}) for r in records)
            if offset is None:
                return summarize_versions(payloads)

    async def mark_superseded(
        self, collection: str, tenant: str, doc_id: str, below: int, *, at_ms: int, by: int
    ) -> None:
        flt = client_filter(doc_filter_tree(tenant, doc_id, below=below, current_only=True))
        await self.client.set_payload(
            collection,
            payload={F_SUPERSEDED: True, F_SUPERSEDED_AT: at_ms, F_SUPERSEDED_BY: by},
            points=qm.FilterSelector(filter=flt),
            wait=True,
        )

    async def count(self, collection: str, tenant: str | None = None) -> int:
        if not await self.client.collection_exists(collection):
            return 0
        flt = client_filter(FBool(must=(FMatch(F_TENANT, tenant),))) if tenant else None
        return int((await self.client.count(collection, count_filter=flt, exact=True)).count)

    # -- search -----------------------------------------------------------------------

    def _parts(self, spec: SearchSpec) -> tuple[qm.Filter, list[tuple[Any, str, Any]]]:
        """The search filter, and (vector, using, params) per prefetch: dense, then sparse."""
        flt = client_filter(search_filter_tree(spec.filter))
        idf = None
        if self.engine == "server":  # per-tenant IDF statistics (local mode has none)
            tenant_only = client_filter(FBool(must=(FMatch(F_TENANT, spec.filter.tenant),)))
            idf = qm.SearchParams(idf=qm.IdfCorpusParams(corpus=tenant_only))
        queries: list[tuple[Any, str, Any]] = []
        if spec.dense is not None:
            queries.append((list(spec.dense), DENSE, None))
        if spec.sparse is not None and spec.sparse.indices:
            sv = qm.SparseVector(indices=list(spec.sparse.indices), values=list(spec.sparse.values))
            queries.append((sv, SPARSE, idf))
        return flt, queries

    async def search(self, collection: str, spec: SearchSpec) -> list[Hit]:
        flt, queries = self._parts(spec)
        if len(queries) == 1:
            vector, using, params = queries[0]
            res = await self.client.query_points(
                collection,
                query=vector,
                using=using,
                query_filter=flt,
                search_params=params,
                limit=spec.limit,
                with_payload=True,
            )
        else:
            res = await self.client.query_points(
                collection,
                prefetch=[
                    qm.Prefetch(query=v, using=u, filter=flt, params=p, limit=spec.prefetch_limit)
                    for v, u, p in queries
                ],
                query=qm.RrfQuery(rrf=qm.Rrf(k=spec.rrf_k)),
                query_filter=flt,
                limit=spec.limit,
                with_payload=True,
            )
        return [_hit(p) for p in res.points]

    async def prefetch(self, collection: str, spec: SearchSpec) -> tuple[list[Hit], list[Hit]]:
        flt, queries = self._parts(spec)
        out: dict[str, list[Hit]] = {}
        for vector, using, params in queries:
            res = await self.client.query_points(
                collection,
                query=vector,
                using=using,
                query_filter=flt,
                search_params=params,
                limit=spec.prefetch_limit,
                with_payload=True,
            )
            out[using] = [_hit(p) for p in res.points]
        return out.get(DENSE, []), out.get(SPARSE, [])

    async def close(self) -> None:
        await self.client.close()
