"""The embedded default vector store: Qdrant's engine in-process (``qdrant-edge-py``).

Each collection is one edge shard in ``<root>/<collection>/`` with its description in
``<root>/<collection>.json``; aliases live in a JSON file (:class:`FileAliasBook`).  Shard
calls are synchronous Rust calls that release the GIL: they run in worker threads so the
event loop keeps serving other partitions.

Sparse IDF statistics are computed per tenant (``IdfParams(corpus=<tenant filter>)``): one
tenant's documents neither change another tenant's scores nor can be inferred from them.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import qdrant_edge as qe

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

__all__ = ["EdgeStore", "edge_filter"]

_UPSERT_BATCH = 512
_SCROLL_PAGE = 1024


def edge_filter(node: FBool) -> qe.Filter:
    return qe.Filter(
        must=[_cond(n) for n in node.must] or None,
        should=[_cond(n) for n in node.should] or None,
        must_not=[_cond(n) for n in node.must_not] or None,
    )


def _cond(node: FNode) -> Any:
    if isinstance(node, FMatch):
        return qe.FieldCondition(node.key, match=qe.MatchValue(node.value))
    if isinstance(node, FAny):
        return qe.FieldCondition(node.key, match=qe.MatchAny(list(node.values)))
    if isinstance(node, FRange):
        return qe.FieldCondition(
            node.key,
            range=qe.RangeFloat(gt=_f(node.gt), gte=_f(node.gte), lt=_f(node.lt), lte=_f(node.lte)),
        )
    if isinstance(node, FEmpty):
        return qe.IsEmptyCondition(node.key)
    return edge_filter(node)


def _f(v: int | None) -> float | None:
    return None if v is None else float(v)


def _index_schema(kind: str) -> Any:
    if kind == "tenant":
        return qe.KeywordIndexParams(is_tenant=True)
    if kind == "keyword":
        return qe.PayloadSchemaType.Keyword
    if kind == "integer":
        return qe.IntegerIndexParams(lookup=True, range=True)
    return qe.PayloadSchemaType.Bool


def _hit(p: Any) -> Hit:
    return Hit(str(p.id), float(p.score), dict(p.payload or {}))


class EdgeStore:
    engine: Engine = "edge"

    def __init__(self, root: Path, *, aliases: AliasBook) -> None:
        self.root = root
        self.aliases = aliases
        self._shards: dict[str, qe.EdgeShard] = {}
        self._meta: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()  # opening/creating shards

    # -- collections ------------------------------------------------------------------

    def _meta_path(self, name: str) -> Path:
        return self.root / f"{name}.json"

    def _read_meta(self, name: str) -> dict[str, Any] | None:
        if name in self._meta:
            return self._meta[name]
        path = self._meta_path(name)
        if not path.exists():
            return None
        meta: dict[str, Any] = json.loads(path.read_text())
        self._meta[name] = meta
        return meta

    def _shard(self, name: str) -> qe.EdgeShard:
        shard = self._shards.get(name)
        if shard is not None:
            return shard
        with self._lock:
            shard = self._shards.get(name)
            if shard is None:
                if self._read_meta(name) is None:
                    raise ConfigError(f"collection {name!r} does not exist")
                shard = qe.EdgeShard.load(str(self.root / name))
                self._shards[name] = shard
            return shard

    def _ensure(self, name: str, dim: int, embed_model: str) -> bool:
        with self._lock:
            meta = self._read_meta(name)
            if meta is not None:
                if int(meta["dim"]) != dim:
                    raise ConfigError(
                        f"collection {name!r} holds {meta['dim']}-d vectors, got {dim}-d"
                    )
                return False
            path = self.root / name
            path.parent.mkdir(parents=True, exist_ok=True)
            config = qe.EdgeConfig(
                vectors={DENSE: qe.EdgeVectorParams(size=dim, distance=qe.Distance.Cosine)},
                sparse_vectors={SPARSE: qe.EdgeSparseVectorParams(modifier=qe.Modifier.Idf)},
            )
            # A crash between creating the shard and writing its description leaves a shard
            # without one: adopt it.
            exists = path.is_dir() and any(path.iterdir())
            if exists:
                shard = qe.EdgeShard.load(str(path))
            else:
                shard = qe.EdgeShard.create(str(path), config)
            for field_name, kind in FIELD_INDEXES.items():
                shard.update(qe.UpdateOperation.create_field_index(field_name, _index_schema(kind)))
            shard.flush()
            meta = {"embed_model": embed_model, "dim": dim}
            tmp = self._meta_path(name).with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(meta) + "\n")
            os.replace(tmp, self._meta_path(name))
            self._meta[name] = meta
            self._shards[name] = shard
            return True

    async def ensure_collection(self, name: str, *, dim: int, embed_model: str) -> bool:
        return await asyncio.to_thread(self._ensure, name, dim, embed_model)

    async def collection_info(self, name: str) -> CollectionInfo | None:
        meta = self._read_meta(name)
        if meta is None:
            return None
        points = await self.count(name)
        return CollectionInfo(name, str(meta["embed_model"]), int(meta["dim"]), points)

    async def list_collections(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.stem for p in self.root.glob("*.json"))

    async def drop_collection(self, name: str) -> None:
        def drop() -> None:
            import shutil

            with self._lock:
                shard = self._shards.pop(name, None)
                if shard is not None:
                    shard.close()
                self._meta.pop(name, None)
                self._meta_path(name).unlink(missing_ok=True)
                shutil.rmtree(self.root / name, ignore_errors=True)

        await asyncio.to_thread(drop)

    async def ensure_keyword_index(self, collection: str, field_name: str) -> None:
        shard = self._shard(collection)
        if field_name in shard.info().payload_schema:
            return
        op = qe.UpdateOperation.create_field_index(field_name, qe.PayloadSchemaType.Keyword)
        await asyncio.to_thread(shard.update, op)

    # -- points -----------------------------------------------------------------------

    async def upsert(self, collection: str, points: Sequence[ChunkPoint]) -> None:
        if not points:
            return
        shard = self._shard(collection)

        def run() -> None:
            for i in range(0, len(points), _UPSERT_BATCH):
                batch = [
                    qe.Point(
                        p.id,
                        {
                            DENSE: list(p.dense),
                            SPARSE: qe.SparseVector(list(p.sparse.indices), list(p.sparse.values)),
                        },
                        p.payload,
                    )
                    for p in points[i : i + _UPSERT_BATCH]
                ]
                shard.update(qe.UpdateOperation.upsert_points(batch))

        await asyncio.to_thread(run)

    async def doc_versions(self, collection: str, tenant: str, doc_id: str) -> list[DocVersion]:
        shard = self._shard(collection)
        flt = edge_filter(doc_filter_tree(tenant, doc_id))
        fields = [F_VERSION, F_VALID_FROM, F_SUPERSEDED, F_SUPERSEDED_AT]

        def run() -> list[DocVersion]:
            payloads: list[dict[str, Any]] = []
            offset: Any = None
            while True:
                records, offset = shard.scroll(
                    qe.ScrollRequest(
                        offset=offset,
                        limit=_SCROLL_PAGE,
                        filter=flt,
                        with_payload=qe.PayloadSelector.Include(fields),
                    )
                )
                payloads.extend(dict(r.payload or {}) for r in records)
                if offset is None:
                    return summarize_versions(payloads)

        return await asyncio.to_thread(run)

    async def mark_superseded(
        self, collection: str, tenant: str, doc_id: str, below: int, *, at_ms: int, by: int
    ) -> None:
        shard = self._shard(collection)
        flt = edge_filter(doc_filter_tree(tenant, doc_id, below=below, current_only=True))
        payload = {F_SUPERSEDED: True, F_SUPERSEDED_AT: at_ms, F_SUPERSEDED_BY: by}
        await asyncio.to_thread(
            shard.update, qe.UpdateOperation.set_payload_by_filter(flt, payload)
        )

    async def count(self, collection: str, tenant: str | None = None) -> int:
        if self._read_meta(collection) is None:
            return 0
        shard = self._shard(collection)
        flt = edge_filter(FBool(must=(FMatch(F_TENANT, tenant),))) if tenant else None
        return int(await asyncio.to_thread(shard.count, qe.CountRequest(exact=True, filter=flt)))

    # -- search -----------------------------------------------------------------------

    def _requests(self, spec: SearchSpec) -> tuple[qe.Filter, list[tuple[Any, Any]]]:
        """The search filter, and (query, params) per prefetch: dense, then sparse."""
        flt = edge_filter(search_filter_tree(spec.filter))
        tenant_only = edge_filter(FBool(must=(FMatch(F_TENANT, spec.filter.tenant),)))
        idf = qe.SearchParams(idf=qe.IdfParams(corpus=tenant_only))
        queries: list[tuple[Any, Any]] = []
        if spec.dense is not None:
            queries.append((qe.Query.Nearest(list(spec.dense), using=DENSE), None))
        if spec.sparse is not None and spec.sparse.indices:
            sv = qe.SparseVector(list(spec.sparse.indices), list(spec.sparse.values))
            queries.append((qe.Query.Nearest(sv, using=SPARSE), idf))
        return flt, queries

    async def search(self, collection: str, spec: SearchSpec) -> list[Hit]:
        shard = self._shard(collection)
        flt, queries = self._requests(spec)
        if len(queries) == 1:
            query, params = queries[0]
            request = qe.QueryRequest(
                limit=spec.limit, query=query, filter=flt, params=params, with_payload=True
            )
        else:
            request = qe.QueryRequest(
                limit=spec.limit,
                prefetches=[
                    qe.Prefetch(limit=spec.prefetch_limit, query=q, filter=flt, params=p)
                    for q, p in queries
                ],
                query=qe.Fusion.Rrf(k=spec.rrf_k),  # type: ignore[arg-type]  # stub too narrow
                filter=flt,
                with_payload=True,
            )
        points = await asyncio.to_thread(shard.query, request)
        return [_hit(p) for p in points]

    async def prefetch(self, collection: str, spec: SearchSpec) -> tuple[list[Hit], list[Hit]]:
        shard = self._shard(collection)
        flt, queries = self._requests(spec)
        reqs = [
            qe.QueryRequest(
                limit=spec.prefetch_limit, query=q, filter=flt, params=p, with_payload=True
            )
            for q, p in queries
        ]
        results = await asyncio.to_thread(shard.query_batch, qe.QueryBatchRequest(reqs))
        hits = [[_hit(p) for p in r] for r in results]
        dense = hits.pop(0) if spec.dense is not None else []
        sparse = hits.pop(0) if hits else []
        return dense, sparse

    async def close(self) -> None:
        def run() -> None:
            with self._lock:
                for shard in self._shards.values():
                    shard.flush()
                    shard.close()
                self._shards.clear()

        await asyncio.to_thread(run)
