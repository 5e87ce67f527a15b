"""Hybrid search: dense and sparse prefetch fused with RRF, position-aware order, citations.

:func:`search_chunks` is the one search code path: the index service calls it for every
``requests.embedded`` event and ``benchmarks/retrieval.py`` measures it.

Reciprocal Rank Fusion (Cormack, Clarke & Büttcher 2009) scores a candidate by
``Σ_lists 1 / (k + rank)``.  Ranks count from 0, as Qdrant's own RRF does, so
:func:`rrf_fuse` (used when an engine cannot fuse) and the engines' fusion order candidates
identically.

Position-aware ordering (:func:`position_order`): language models use the start and the end
of a long context best and the middle worst ("lost in the middle", Liu et al. 2023), so the
final chunks go best first, second-best last, and the weaker ones in between.

Optional rerank (:func:`rerank`): the fused candidates (the plan's ``rerank_top_n``, 20 by
default) are scored by a reranker against the query and the best ``top_k`` kept, before the
position-aware order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal, TypeVar

from stratamesh.events import Citation
from stratamesh.models.rerankers import Reranker
from stratamesh.stores.vectors import (
    F_CHUNK_ID,
    F_DOC_ID,
    F_SECTION_PATH,
    F_TEXT,
    F_TITLE,
    F_VERSION,
    Hit,
    SearchFilter,
    SearchSpec,
    SparseVec,
    VectorStore,
)

__all__ = [
    "Mode",
    "Ranked",
    "citation",
    "citations",
    "position_order",
    "rerank",
    "rrf_fuse",
    "search_chunks",
]

Mode = Literal["hybrid", "dense", "sparse"]
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Ranked:
    """A hit with its relevance rank (0 = best), before position-aware reordering."""

    rank: int
    hit: Hit


def rrf_fuse(lists: Sequence[Sequence[Hit]], k: int = 60) -> list[Hit]:
    """Fuse ranked lists by reciprocal rank; each hit's score becomes its fused score.

    Ties keep the order of first appearance (the best single-list rank wins).
    """
    scores: dict[str, float] = {}
    first: dict[str, tuple[int, int]] = {}
    hits: dict[str, Hit] = {}
    for li, ranked in enumerate(lists):
        for rank, hit in enumerate(ranked):
            scores[hit.id] = scores.get(hit.id, 0.0) + 1.0 / (k + rank)
            if hit.id not in first or (rank, li) < first[hit.id]:
                first[hit.id] = (rank, li)
            hits.setdefault(hit.id, hit)
    order = sorted(scores, key=lambda pid: (-scores[pid], first[pid]))
    return [replace(hits[pid], score=scores[pid]) for pid in order]


def position_order(items: Sequence[T]) -> list[T]:
    """Best first, second-best last, the rest alternating inwards: r0 r2 r4 … r5 r3 r1."""
    front = list(items[0::2])
    back = list(items[1::2])
    return front + back[::-1]


async def search_chunks(
    store: VectorStore,
    collection: str,
    flt: SearchFilter,
    *,
    dense: Sequence[float] | None,
    sparse: SparseVec | None,
    top_k: int,
    prefetch_limit: int,
    rrf_k: int,
    mode: Mode = "hybrid",
    fusion: Literal["engine", "client"] = "engine",
) -> list[Ranked]:
    """The ``top_k`` chunks for a query, ranked (0 = best).

    ``mode`` picks the retrievers; a query without sparse terms falls back to dense alone.
    ``fusion="client"`` fetches both candidate lists and fuses them with :func:`rrf_fuse`
    (for engines without RRF, and to check an engine's fusion).
    """
    d = dense if mode in ("hybrid", "dense") and dense else None
    s = sparse if mode in ("hybrid", "sparse") and sparse is not None and sparse.indices else None
    if d is None and s is None:
        return []
    spec = SearchSpec(
        flt,
        dense=d,
        sparse=s,
        limit=top_k,
        prefetch_limit=max(prefetch_limit, top_k),
        rrf_k=rrf_k,
    )
    if spec.hybrid and fusion == "client":
        dense_hits, sparse_hits = await store.prefetch(collection, spec)
        hits = rrf_fuse([dense_hits, sparse_hits], rrf_k)[:top_k]
    else:
        hits = await store.search(collection, spec)
    return [Ranked(i, h) for i, h in enumerate(hits[:top_k])]


def passage(hit: Hit) -> str:
    """What a reranker reads of a chunk: its title, then its text (as the embedder does)."""
    title = str(hit.payload.get(F_TITLE, ""))
    text = str(hit.payload.get(F_TEXT, ""))
    return f"{title}\n{text}" if title and not text.startswith(title) else text


async def rerank(
    reranker: Reranker, query: str, ranked: Sequence[Ranked], top_k: int
) -> list[Ranked]:
    """The ``top_k`` of ``ranked`` by the reranker's scores (ties keep the fused order);
    each hit's score becomes its rerank score."""
    if not ranked:
        return []
    scores = await reranker.scores(query, [passage(r.hit) for r in ranked])
    order = sorted(range(len(ranked)), key=lambda i: (-scores[i], ranked[i].rank))
    return [
        Ranked(new, replace(ranked[i].hit, score=scores[i])) for new, i in enumerate(order[:top_k])
    ]


def citation(ranked: Ranked) -> Citation:
    p = ranked.hit.payload
    return Citation(
        doc_id=str(p.get(F_DOC_ID, "")),
        doc_version=int(p.get(F_VERSION, 0)),
        chunk_id=str(p.get(F_CHUNK_ID, "")),
        text=str(p.get(F_TEXT, "")),
        score=float(ranked.hit.score),
        rank=ranked.rank,
        title=str(p.get(F_TITLE, "")),
        section_path=[str(s) for s in p.get(F_SECTION_PATH, [])],
    )


def citations(ranked: Sequence[Ranked]) -> list[Citation]:
    """Citations in position-aware order (each keeps its relevance ``rank``)."""
    return [citation(r) for r in position_order(ranked)]
