"""Upserting embedded chunks, and which versions of a document are current.

A document version's chunks become points of the collection of its embedding model.  When
version ``v`` of (tenant, doc_id) is indexed, every current version below ``v`` is marked
superseded (``superseded_at`` = the time ``v`` became valid); a version that arrives after a
newer one (a redelivery, a replay, a DLQ redrive) is written already superseded, so the
newest version stays the only current one whatever the arrival order.

Events of one document share a partition, so they arrive in order within a batch; a batch
may hold several versions of a document and is resolved in version order before a single
upsert.  Upserts are idempotent: a point's id derives from (tenant, chunk id).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from stratamesh.errors import Poison
from stratamesh.events import ChunksEmbedded
from stratamesh.stores.vectors import (
    F_ACL,
    F_CHUNK_ID,
    F_DOC_ID,
    F_EMBED_MODEL,
    F_EXPIRES_AT,
    F_KNOWLEDGE_CLASS,
    F_METADATA,
    F_POSITION,
    F_SECTION_PATH,
    F_SPARSE_MODEL,
    F_SUPERSEDED,
    F_SUPERSEDED_AT,
    F_SUPERSEDED_BY,
    F_TENANT,
    F_TEXT,
    F_TITLE,
    F_VALID_FROM,
    F_VERSION,
    ChunkPoint,
    SparseVec,
    VectorStore,
)

from .catalog import Catalog

__all__ = ["SUBMITTED_AT", "Indexed", "epoch_ms", "index_events", "source_ms"]

SUBMITTED_AT: Final = "submitted_at"
"""``versions`` key an upstream stage may set to the DocumentSubmitted time (epoch ms)."""


@dataclass(frozen=True, slots=True)
class Indexed:
    """What indexing one ChunksEmbedded did."""

    collection: str
    chunk_ids: list[str]
    superseded_version: int | None  # the version this one replaced as current, if any
    current: bool  # False: a newer version was already indexed


def epoch_ms(when: datetime) -> int:
    return int(when.timestamp() * 1000)


def source_ms(event: ChunksEmbedded) -> int:
    """The document's event time: ``versions["submitted_at"]`` (epoch ms) when the chain
    carries it, else the event's own ``occurred_at``.

    It is the version's ``valid_from`` (for ``as_of`` queries) and the start of the index
    lag.  Carried from submission it is the same on every replay; ``occurred_at`` of a
    replayed ChunksEmbedded is the replay's time.
    """
    own = epoch_ms(event.occurred_at)
    raw = event.versions.get(SUBMITTED_AT)
    if raw is not None:
        try:
            submitted = int(raw)
        except ValueError:
            return own
        if 0 < submitted <= own:
            return submitted
    return own


def chunk_points(
    event: ChunksEmbedded, tenant: str, valid_from: int, superseded: tuple[int, int] | None
) -> list[ChunkPoint]:
    """The points of an event; ``superseded`` = (at_ms, by_version) for a late version."""
    points = []
    for item in event.embeddings:
        chunk = item.chunk
        if len(item.dense) != event.dim:
            raise Poison(
                f"chunk {chunk.chunk_id}: dense vector has {len(item.dense)} values, "
                f"the event says dim={event.dim}"
            )
        if len(item.sparse.indices) != len(item.sparse.values):
            raise Poison(f"chunk {chunk.chunk_id}: sparse indices and values differ in length")
        payload: dict[str, Any] = {
            F_TENANT: tenant,
            F_DOC_ID: event.doc_id,
            F_CHUNK_ID: chunk.chunk_id,
            F_VERSION: event.doc_version,
            F_SUPERSEDED: superseded is not None,
            F_VALID_FROM: valid_from,
            F_KNOWLEDGE_CLASS: chunk.knowledge_class.value,
            F_ACL: list(chunk.acl),
            F_METADATA: dict(chunk.metadata),
            F_TEXT: chunk.text,
            F_TITLE: chunk.title,
            F_SECTION_PATH: list(chunk.section_path),
            F_POSITION: chunk.position,
            F_EMBED_MODEL: event.embed_model,
            F_SPARSE_MODEL: event.sparse_model,
        }
        if chunk.expires_at is not None:
            payload[F_EXPIRES_AT] = epoch_ms(chunk.expires_at)
        if superseded is not None:
            payload[F_SUPERSEDED_AT], payload[F_SUPERSEDED_BY] = superseded
        points.append(
            ChunkPoint(
                tenant,
                chunk.chunk_id,
                item.dense,
                SparseVec(item.sparse.indices, item.sparse.values),
                payload,
            )
        )
    return points


async def index_events(
    store: VectorStore, catalog: Catalog, items: list[tuple[ChunksEmbedded, str]]
) -> list[Indexed]:
    """Upsert the chunks of ``(event, authenticated tenant)`` pairs; one result per pair."""
    collections = [await catalog.for_write(ev.embed_model, ev.dim) for ev, _ in items]
    groups: dict[tuple[str, str, str], list[int]] = defaultdict(list)
    for i, (ev, tenant) in enumerate(items):
        if not tenant:
            raise Poison("ChunksEmbedded without an authenticated tenant")
        groups[(collections[i], tenant, ev.doc_id)].append(i)

    results: list[Indexed | None] = [None] * len(items)
    points: dict[str, list[ChunkPoint]] = defaultdict(list)
    marks: list[tuple[str, str, str, int, int]] = []  # collection, tenant, doc, version, at
    for (collection, tenant, doc_id), idxs in groups.items():
        # valid_from and "current" of every version known: stored ones, then this batch's.
        known: dict[int, tuple[int, bool]] = {
            dv.version: (dv.valid_from, not dv.superseded)
            for dv in await store.doc_versions(collection, tenant, doc_id)
        }
        for i in idxs:
            ev = items[i][0]
            valid = source_ms(ev)
            old = known.get(ev.doc_version)
            known[ev.doc_version] = (min(valid, old[0]) if old else valid, True)
        for i in sorted(idxs, key=lambda j: items[j][0].doc_version):
            ev = items[i][0]
            v = ev.doc_version
            valid_from = known[v][0]
            newer = sorted(x for x in known if x > v)
            late = (known[newer[0]][0], newer[0]) if newer else None
            replaced = None
            if late is None:
                older_current = [x for x, (_, cur) in known.items() if x < v and cur]
                replaced = max(older_current) if older_current else None
                for x in older_current:
                    known[x] = (known[x][0], False)
                marks.append((collection, tenant, doc_id, v, valid_from))
            points[collection].extend(chunk_points(ev, tenant, valid_from, late))
            results[i] = Indexed(
                collection,
                [e.chunk.chunk_id for e in ev.embeddings],
                replaced,
                late is None,
            )
    for collection, batch in points.items():
        await store.upsert(collection, batch)
    for collection, tenant, doc_id, v, at in marks:
        await store.mark_superseded(collection, tenant, doc_id, v, at_ms=at, by=v)
    return [r for r in results if r is not None]
