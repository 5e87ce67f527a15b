"""Vector store engines behind the one VectorStore interface: which is the embedded default?

Builds the same synthetic collection in every embedded engine — 10k points, 384-d unit dense
vectors, sparse BM25-style vectors (Zipf-distributed term ids, BM25-saturated weights, IDF
modifier), the index payload (one big tenant plus small ones, 10% superseded, 5% expired,
metadata) — and times, through ``stratamesh.stores.vectors.VectorStore``:

- ``upsert``: all points in batches of 256 (seconds for 10k),
- ``dense``: nearest neighbours under the standard search filter (tenant, current
  version, not expired, ACL),
- ``filtered``: the same plus a selective metadata filter (~10% of the tenant),
- ``sparse``: the sparse vector alone,
- ``hybrid``: dense and sparse prefetch (20 each) fused with RRF (k=60).

    python benchmarks/vector_stores.py [--points 10000] [--queries 50] [--engines edge local]

Prints one JSON object on the last line: {"engines": {engine: {op: ms ...}}, ...}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from _report import emit, machine
from stratamesh.config import Settings
from stratamesh.stores.vectors import (
    F_ACL,
    F_CHUNK_ID,
    F_DOC_ID,
    F_EXPIRES_AT,
    F_KNOWLEDGE_CLASS,
    F_METADATA,
    F_SUPERSEDED,
    F_SUPERSEDED_AT,
    F_TENANT,
    F_VALID_FROM,
    F_VERSION,
    ChunkPoint,
    SearchFilter,
    SearchSpec,
    SparseVec,
    VectorStore,
    collection_name,
    open_vector_store,
)

DIM = 384
VOCAB = 30_000
NOW_MS = 1_800_000_000_000
BATCH = 256


def make_points(n: int, seed: int = 7) -> tuple[list[ChunkPoint], np.ndarray, list[list[int]]]:
    rng = np.random.default_rng(seed)
    dense = rng.standard_normal((n, DIM)).astype(np.float32)
    dense /= np.linalg.norm(dense, axis=1, keepdims=True)
    points: list[ChunkPoint] = []
    terms_of: list[list[int]] = []
    for i in range(n):
        length = int(rng.integers(60, 200))
        tokens = np.minimum(rng.zipf(1.3, length), VOCAB - 1)
        ids, tf = np.unique(tokens, return_counts=True)
        weights = tf * 2.2 / (tf + 1.2 * (0.25 + 0.75 * length / 130))  # BM25 saturation
        terms_of.append(ids.tolist())
        tenant = "t0" if i % 10 else f"t{1 + (i // 10) % 9}"
        payload: dict[str, Any] = {
            F_TENANT: tenant,
            F_DOC_ID: f"d{i // 4}",
            F_CHUNK_ID: f"c{i}",
            F_VERSION: 1,
            F_SUPERSEDED: False,
            F_VALID_FROM: NOW_MS - 86_400_000,
            F_KNOWLEDGE_CLASS: "fluid" if i % 2 else "anchored",
            F_ACL: [],
            F_METADATA: {"category": f"c{i % 10}"},
            "text": f"chunk {i}",
        }
        if i % 10 == 3:
            payload[F_SUPERSEDED] = True
            payload[F_SUPERSEDED_AT] = NOW_MS - 3_600_000
        if i % 20 == 7:
            payload[F_EXPIRES_AT] = NOW_MS - 1_000
        points.append(
            ChunkPoint(
                tenant,
                f"c{i}",
                dense[i].tolist(),
                SparseVec(ids.astype(int).tolist(), weights.astype(float).tolist()),
                payload,
            )
        )
    return points, dense, terms_of


def make_queries(
    dense: np.ndarray, terms_of: list[list[int]], count: int, seed: int = 11
) -> list[tuple[list[float], SparseVec]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        i = int(rng.integers(0, len(dense)))
        q = dense[i] + 0.5 * rng.standard_normal(DIM).astype(np.float32) / np.sqrt(DIM)
        q /= np.linalg.norm(q)
        terms = sorted(set(rng.choice(terms_of[i], size=min(6, len(terms_of[i])), replace=False)))
        out.append((q.tolist(), SparseVec([int(t) for t in terms], [1.0] * len(terms))))
    return out


def _stats(samples_ms: list[float]) -> dict[str, float]:
    ordered = sorted(samples_ms)
    return {
        "mean_ms": round(statistics.fmean(ordered), 3),
        "p50_ms": round(ordered[len(ordered) // 2], 3),
        "p95_ms": round(ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))], 3),
    }


async def bench_engine(
    store: VectorStore, points: list[ChunkPoint], queries: list[tuple[list[float], SparseVec]]
) -> dict[str, Any]:
    name = collection_name("bench", "synthetic@1")
    await store.ensure_collection(name, dim=DIM, embed_model="synthetic@1")
    started = time.perf_counter()
    for i in range(0, len(points), BATCH):
        await store.upsert(name, points[i : i + BATCH])
    upsert_s = time.perf_counter() - started
    assert await store.count(name) == len(points)
    # What the index service does on the first search filtering on a metadata key.
    await store.ensure_keyword_index(name, "metadata.category")
    base = SearchFilter(tenant="t0", now_ms=NOW_MS)
    narrow = SearchFilter(
        tenant="t0", now_ms=NOW_MS, knowledge_class="fluid", metadata={"category": "c3"}
    )
    kinds = {
        "dense": lambda d, s: SearchSpec(base, dense=d, limit=10),
        "filtered": lambda d, s: SearchSpec(narrow, dense=d, limit=10),
        "sparse": lambda d, s: SearchSpec(base, sparse=s, limit=10),
        "hybrid": lambda d, s: SearchSpec(base, dense=d, sparse=s, limit=10, prefetch_limit=20),
    }
    result: dict[str, Any] = {
        "upsert_s": round(upsert_s, 3),
        "upsert_points_per_s": round(len(points) / upsert_s),
    }
    for kind, build in kinds.items():
        await store.search(name, build(*queries[0]))  # warm
        samples = []
        for d, s in queries:
            t0 = time.perf_counter()
            hits = await store.search(name, build(d, s))
            samples.append((time.perf_counter() - t0) * 1000)
            assert all(h.payload[F_TENANT] == "t0" for h in hits)
            assert not any(h.payload[F_SUPERSEDED] for h in hits)
        result[kind] = _stats(samples)
    await store.drop_collection(name)
    return result


async def run(args: argparse.Namespace) -> dict[str, Any]:
    points, dense, terms_of = make_points(args.points)
    queries = make_queries(dense, terms_of, args.queries)
    engines: dict[str, Any] = {}
    for engine in args.engines:
        with tempfile.TemporaryDirectory() as tmp:
            settings = Settings(home=Path(tmp))
            if engine == "local-memory":
                store = open_vector_store(settings, engine="local", in_memory=True)
            else:
                store = open_vector_store(settings, engine=engine)
            n = args.queries if engine == "edge" else max(5, args.queries // 5)
            try:
                engines[engine] = await bench_engine(store, points, queries[:n])
                engines[engine]["queries"] = n
            finally:
                await store.close()
        print(engine, json.dumps(engines[engine]), file=sys.stderr)
    speedups: dict[str, float] = {}
    if "edge" in engines:
        for other in (e for e in engines if e != "edge"):
            for kind in ("dense", "filtered", "sparse", "hybrid"):
                speedups[f"{kind}_vs_{other}"] = round(
                    engines[other][kind]["mean_ms"] / engines["edge"][kind]["mean_ms"], 1
                )
            speedups[f"upsert_vs_{other}"] = round(
                engines[other]["upsert_s"] / engines["edge"]["upsert_s"], 1
            )
    return {
        "benchmark": "vector_stores",
        "machine": machine(),
        "points": args.points,
        "dim": DIM,
        "engines": engines,
        "edge_speedup": speedups,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--points", type=int, default=10_000)
    parser.add_argument("--queries", type=int, default=50)
    parser.add_argument(
        "--engines",
        nargs="+",
        default=["edge", "local-memory", "local"],
        choices=["edge", "local-memory", "local"],
    )
    parser.add_argument("--output", type=Path, help="also write the JSON here")
    args = parser.parse_args()
    result = asyncio.run(run(args))
    emit(result, args.output)


if __name__ == "__main__":
    main()
