"""Retrieval quality of the index: sparse-only, dense-only and hybrid, against bm25s.

Indexes a BEIR corpus through the index service's own write path (one ChunksEmbedded per
document, as the embed service makes them: the real embedding model of the settings via
``stratamesh.models.embedders.make_embedder``, BM25-saturated sparse vectors from
``stratamesh.models.sparse``; ``index_events`` into the configured embedded engine), then
runs every query through ``search_chunks`` — the function the index service calls — in
three modes, plus a standalone ``bm25s`` index over the same texts as a reference and a
client-side RRF of bm25s and dense (the "plain BM25 + dense RRF" of DESIGN.md §9).

    python benchmarks/retrieval.py [--queries FILE] [--qrels FILE] [--corpus FILE]
        [--prefetch N] [--rrf-k K] [--sweep] [--cache DIR] [--output FILE]

Defaults: SciFact (``../shared/data/beir-scifact/``: corpus.jsonl, queries.jsonl,
qrels/train.tsv).  Only queries with judgements are scored (as BEIR does).  Documents are
embedded as ``title\\ntext`` (what the embed service embeds for a chunk with a title).
``--sweep`` also scores hybrid over a grid of prefetch depths and RRF k.

Prints one JSON object on the last line; its keys ``ndcg_at_10`` and ``recall_at_10`` hold
``{sparse, dense, hybrid, bm25s}``.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import hashlib
import json
import math
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from _report import emit, machine
from stratamesh.config import Settings
from stratamesh.events import Chunk, ChunksEmbedded, EmbeddedChunk, KnowledgeClass, SparseVector
from stratamesh.models.embedders import make_embedder, model_stamp
from stratamesh.models.sparse import SPARSE_MODEL, document_vector, query_vector
from stratamesh.services.index.catalog import Catalog
from stratamesh.services.index.indexing import index_events
from stratamesh.services.index.search import Mode, rrf_fuse, search_chunks
from stratamesh.stores.vectors import (
    F_DOC_ID,
    Hit,
    SearchFilter,
    SparseVec,
    VectorStore,
    open_vector_store,
)

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "beir-scifact"
TENANT = "bench"
TOP_K = 10
INDEX_BATCH = 64


# --------------------------------------------------------------------------- data


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with path.open() as f:
        return [json.loads(line) for line in f if line.strip()]


def read_qrels(path: Path) -> dict[str, dict[str, int]]:
    qrels: dict[str, dict[str, int]] = defaultdict(dict)
    with path.open() as f:
        rows = csv.reader(f, delimiter="\t")
        header = next(rows)
        if header[0].isdigit():  # no header line
            rows = iter([header, *rows])
        for row in rows:
            if len(row) >= 3:
                qrels[row[0]][row[1]] = int(row[2])
    return dict(qrels)


def doc_text(doc: dict[str, Any]) -> str:
    title, text = str(doc.get("title") or ""), str(doc.get("text") or "")
    return f"{title}\n{text}" if title and not text.startswith(title) else text


# --------------------------------------------------------------------------- metrics


def ndcg_at(ranked: Sequence[str], rels: dict[str, int], k: int = TOP_K) -> float:
    dcg = sum((2 ** rels.get(d, 0) - 1) / math.log2(i + 2) for i, d in enumerate(ranked[:k]))
    ideal = sorted((r for r in rels.values() if r > 0), reverse=True)[:k]
    idcg = sum((2**r - 1) / math.log2(i + 2) for i, r in enumerate(ideal))
    return dcg / idcg if idcg > 0 else 0.0


def recall_at(ranked: Sequence[str], rels: dict[str, int], k: int = TOP_K) -> float:
    relevant = {d for d, r in rels.items() if r > 0}
    return len(relevant & set(ranked[:k])) / len(relevant) if relevant else 0.0


def score(runs: dict[str, list[str]], qrels: dict[str, dict[str, int]]) -> tuple[float, float]:
    ids = [q for q in qrels if q in runs]
    ndcg = sum(ndcg_at(runs[q], qrels[q]) for q in ids) / len(ids)
    recall = sum(recall_at(runs[q], qrels[q]) for q in ids) / len(ids)
    return round(ndcg, 4), round(recall, 4)


# --------------------------------------------------------------------------- embedding


async def embed_all(
    settings: Settings, texts: list[str], cache: Path | None
) -> tuple[np.ndarray, str]:
    embedder = make_embedder(settings)
    stamp = model_stamp(embedder)
    path = None
    if cache is not None:
        key = hashlib.sha256(("\x1f".join([stamp, *texts])).encode()).hexdigest()[:16]
        path = cache / f"dense-{key}.npy"
        if path.exists():
            return np.load(path), stamp
    vectors = await embedder.embed(texts)
    await embedder.aclose()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, vectors)
    return np.asarray(vectors, dtype=np.float32), stamp


# --------------------------------------------------------------------------- index


def event_of(doc: dict[str, Any], text: str, dense: np.ndarray, stamp: str) -> ChunksEmbedded:
    sparse = document_vector(text)
    chunk = Chunk(
        chunk_id=f"{doc['_id']}:1:0",
        position=0,
        text=text,
        section_path=[],
        token_count=len(text.split()),
        title=str(doc.get("title") or ""),
        version=1,
        knowledge_class=KnowledgeClass.ANCHORED,
        expires_at=None,
        acl=[],
        metadata={},
    )
    return ChunksEmbedded(
        event_id="0190d5e6-0000-7000-8000-000000000000",
        tenant=TENANT,
        occurred_at=datetime.now(UTC),
        producer="embed",
        versions={},
        doc_id=str(doc["_id"]),
        doc_version=1,
        embed_model=stamp,
        dim=int(dense.shape[0]),
        sparse_model=SPARSE_MODEL,
        embeddings=[
            EmbeddedChunk(
                chunk=chunk,
                dense=dense.tolist(),
                sparse=SparseVector(indices=sparse.indices, values=sparse.values),
            )
        ],
    )


async def build_index(
    store: VectorStore,
    catalog: Catalog,
    corpus: list[dict[str, Any]],
    texts: list[str],
    dense: np.ndarray,
    stamp: str,
) -> str:
    collection = ""
    for i in range(0, len(corpus), INDEX_BATCH):
        events = [
            (event_of(corpus[j], texts[j], dense[j], stamp), TENANT)
            for j in range(i, min(i + INDEX_BATCH, len(corpus)))
        ]
        collection = (await index_events(store, catalog, events))[0].collection
    return collection


async def run_mode(
    store: VectorStore,
    collection: str,
    queries: list[tuple[str, np.ndarray, SparseVec]],
    mode: Mode,
    prefetch: int,
    rrf_k: int,
    top_k: int = TOP_K,
) -> tuple[dict[str, list[str]], float]:
    runs: dict[str, list[str]] = {}
    started = time.perf_counter()
    for qid, dense, sparse in queries:
        ranked = await search_chunks(
            store,
            collection,
            SearchFilter(tenant=TENANT, now_ms=time.time_ns() // 1_000_000),
            dense=dense.tolist(),
            sparse=sparse,
            top_k=top_k,
            prefetch_limit=prefetch,
            rrf_k=rrf_k,
            mode=mode,
        )
        runs[qid] = [str(r.hit.payload[F_DOC_ID]) for r in ranked]
    per_query_ms = (time.perf_counter() - started) / max(1, len(queries)) * 1000
    return runs, per_query_ms


def bm25s_runs(
    corpus: list[dict[str, Any]], texts: list[str], queries: list[tuple[str, str]], depth: int
) -> dict[str, list[tuple[str, int]]]:
    import bm25s

    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize(texts, stopwords="en", show_progress=False), show_progress=False)
    tokens = bm25s.tokenize([q for _, q in queries], stopwords="en", show_progress=False)
    docs, _ = retriever.retrieve(tokens, k=min(depth, len(texts)), show_progress=False)
    ids = [str(d["_id"]) for d in corpus]
    return {
        qid: [(ids[int(j)], r) for r, j in enumerate(row)]
        for (qid, _), row in zip(queries, docs, strict=True)
    }


# --------------------------------------------------------------------------- main


async def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    corpus = read_jsonl(args.corpus)
    qrels = read_qrels(args.qrels)
    all_queries = {str(q["_id"]): str(q["text"]) for q in read_jsonl(args.queries)}
    queries = [(qid, all_queries[qid]) for qid in qrels if qid in all_queries]
    qrels = {qid: qrels[qid] for qid, _ in queries}
    texts = [doc_text(d) for d in corpus]
    settings = Settings(home=Path(tempfile.mkdtemp(prefix="strata-retrieval-")))
    cfg = settings.index
    prefetch = args.prefetch or cfg.prefetch_limit
    rrf_k = args.rrf_k or cfg.rrf_k

    t0 = time.perf_counter()
    doc_dense, stamp = await embed_all(settings, texts, args.cache)
    q_dense, _ = await embed_all(settings, [q for _, q in queries], args.cache)
    embed_s = time.perf_counter() - t0

    store = open_vector_store(settings, engine=args.engine)
    catalog = Catalog(store, cfg.collection_prefix)
    try:
        t1 = time.perf_counter()
        collection = await build_index(store, catalog, corpus, texts, doc_dense, stamp)
        index_s = time.perf_counter() - t1
        prepared = [
            (qid, q_dense[i], SparseVec(*_sv(query_vector(text))))
            for i, (qid, text) in enumerate(queries)
        ]
        ndcg: dict[str, float] = {}
        recall: dict[str, float] = {}
        latency: dict[str, float] = {}
        runs_by_mode: dict[str, dict[str, list[str]]] = {}
        for mode in ("sparse", "dense", "hybrid"):
            runs, ms = await run_mode(store, collection, prepared, mode, prefetch, rrf_k)
            runs_by_mode[mode] = runs
            ndcg[mode], recall[mode] = score(runs, qrels)
            latency[mode] = round(ms, 3)
        bm = bm25s_runs(corpus, texts, queries, max(prefetch, TOP_K))
        bm_top = {q: [d for d, _ in v[:TOP_K]] for q, v in bm.items()}
        ndcg["bm25s"], recall["bm25s"] = score(bm_top, qrels)

        # Reference: plain client-side RRF of bm25s and dense (same depths, same k).
        dense_deep, _ = await run_mode(
            store, collection, prepared, "dense", prefetch, rrf_k, top_k=prefetch
        )
        plain = {
            qid: [
                h.id
                for h in rrf_fuse(
                    [
                        [Hit(d, 0.0, {}) for d in dense_deep[qid]],
                        [Hit(d, 0.0, {}) for d, _ in bm[qid][:prefetch]],
                    ],
                    rrf_k,
                )[:TOP_K]
            ]
            for qid, _, _ in prepared
        }
        reference = dict(zip(("ndcg_at_10", "recall_at_10"), score(plain, qrels), strict=True))

        sweep: list[dict[str, Any]] = []
        if args.sweep:
            for p in (10, 20, 50, 100):
                for k in (10, 30, 60, 100):
                    runs, _ = await run_mode(store, collection, prepared, "hybrid", p, k)
                    n, r = score(runs, qrels)
                    sweep.append({"prefetch": p, "rrf_k": k, "ndcg_at_10": n, "recall_at_10": r})
                    print(json.dumps(sweep[-1]), file=sys.stderr)
    finally:
        await store.close()

    return {
        "benchmark": "retrieval",
        "machine": machine(),
        "data": {
            "corpus": str(args.corpus),
            "queries": str(args.queries),
            "qrels": str(args.qrels),
            "documents": len(corpus),
            "scored_queries": len(queries),
        },
        "embed_model": stamp,
        "sparse_model": SPARSE_MODEL,
        "engine": store.engine,
        "prefetch": prefetch,
        "rrf_k": rrf_k,
        "seconds": {"embed": round(embed_s, 1), "index": round(index_s, 1)},
        "query_ms": latency,
        "bm25s_dense_rrf": reference,
        "sweep": sweep,
        "targets": {"hybrid_above": ["sparse", "dense", "bm25s", "bm25s_dense_rrf"]},
        "hybrid_beats_both": ndcg["hybrid"] > max(ndcg["sparse"], ndcg["dense"]),
        "ndcg_at_10": ndcg,
        "recall_at_10": recall,
    }


def _sv(v: Any) -> tuple[list[int], list[float]]:
    return list(v.indices), list(v.values)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--queries", type=Path, default=DATA / "queries.jsonl")
    parser.add_argument("--qrels", type=Path, default=DATA / "qrels" / "train.tsv")
    parser.add_argument("--corpus", type=Path, default=DATA / "corpus.jsonl")
    parser.add_argument("--prefetch", type=int, help="candidates per prefetch (default: settings)")
    parser.add_argument("--rrf-k", type=int, help="RRF k (default: settings)")
    parser.add_argument("--engine", choices=["edge", "local"], default=None)
    parser.add_argument("--sweep", action="store_true", help="also grid prefetch × rrf_k")
    parser.add_argument("--cache", type=Path, help="keep dense embeddings here between runs")
    parser.add_argument("--output", type=Path, help="also write the JSON here")
    args = parser.parse_args()
    result = asyncio.run(evaluate(args))
    emit(result, args.output)


if __name__ == "__main__":
    main()
