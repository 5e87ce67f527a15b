"""Ingestion through the running mesh against the embedding model's own batched throughput.

Starts the embedded broker (or uses --bootstrap), runs `strata run ingest|embed|index` as three
processes, publishes a BEIR corpus (default SciFact, ../shared/data/beir-scifact/corpus.jsonl)
with the `strata ingest` client, and follows docs.indexed until every accepted document is
searchable.  In the same run, before the mesh starts, it measures the model alone: the same
number of chunk-sized texts embedded at the configured batch size.

    python benchmarks/ingest.py [--corpus FILE] [--limit N] [--bootstrap HOST:PORT]

Last line of stdout: one JSON object with `chunks_per_s`, `model_chunks_per_s`, `ratio`,
`index_lag_p50_s`, `index_lag_p99_s` (and the counts behind them).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from aiokafka import TopicPartition

from _report import emit, machine, percentile
from stratamesh.bus import topics as T
from stratamesh.bus.admin import ensure_topics
from stratamesh.bus.codec import Codec
from stratamesh.bus.offsets import open_consumer, topic_partitions, true_end_offsets
from stratamesh.config import Settings
from stratamesh.docs_client import ingest_paths
from stratamesh.embedded import EmbeddedBroker
from stratamesh.embedded.up import DEV_CLIENT, ensure_dev_keys
from stratamesh.events import ChunksIndexed
from stratamesh.models.embedders import make_embedder

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CORPUS = ROOT.parent / "shared" / "data" / "beir-scifact" / "corpus.jsonl"
SERVICES = ("ingest", "embed", "index")


async def model_throughput(settings: Settings, texts: list[str]) -> float:
    """Chunks/s of the embedding model alone at the configured batch size (after warm-up)."""
    embedder = make_embedder(settings)
    size = settings.embed.batch_size
    await embedder.embed(texts[:size])  # load and warm up
    start = time.perf_counter()
    for i in range(0, len(texts), size):
        await embedder.embed(texts[i : i + size])
    elapsed = time.perf_counter() - start
    await embedder.aclose()
    return len(texts) / elapsed


def corpus_texts(path: Path, limit: int) -> list[str]:
    texts = []
    with path.open() as f:
        for line in f:
            doc = json.loads(line)
            texts.append(f"{doc.get('title', '')}\n{doc.get('text', '')}".strip())
            if len(texts) >= limit:
                break
    return texts


def limited_corpus(path: Path, limit: int, into: Path) -> Path:
    with path.open() as src, into.open("w") as dst:
        for i, line in enumerate(src):
            if i >= limit:
                break
            dst.write(line)
    return into


def start_services(settings: Settings) -> list[subprocess.Popen[bytes]]:
    env = {
        **os.environ,
        "STRATA_HOME": str(settings.home),
        "STRATA_BOOTSTRAP_SERVERS": settings.bootstrap_servers or "",
        "STRATA_LOG_LEVEL": "INFO",
    }
    return [
        subprocess.Popen(
            [sys.executable, "-m", "stratamesh.cli", "run", name],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=(settings.home / f"{name}.log").open("w"),
        )
        for name in SERVICES
    ]


def stop_services(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(20)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)


async def follow_indexed(
    settings: Settings, start: dict[TopicPartition, int], docs: int, deadline_s: float
) -> list[ChunksIndexed]:
    """ChunksIndexed events after ``start`` until one per document arrived (or the deadline)."""
    codec = Codec.from_settings(settings)
    seen: dict[str, ChunksIndexed] = {}
    async with open_consumer(settings) as consumer:
        tps = list(start)
        consumer.assign(tps)
        for tp, offset in start.items():
            consumer.seek(tp, offset)
        end = time.monotonic() + deadline_s
        while len(seen) < docs and time.monotonic() < end:
            batch = await consumer.getmany(timeout_ms=200)
            for records in batch.values():
                for r in records:
                    event = codec.decode(r.value)
                    if isinstance(event, ChunksIndexed):
                        seen[event.doc_id] = event
    return list(seen.values())


async def run(args: argparse.Namespace) -> dict[str, Any]:
    broker = None
    bootstrap = args.bootstrap
    if bootstrap is None:
        broker = EmbeddedBroker()
        broker.start()
        bootstrap = broker.bootstrap
    home = Path(tempfile.mkdtemp(prefix="strata-bench-ingest-"))
    settings = Settings(
        home=home, bootstrap_servers=bootstrap, redis_url=os.environ.get("STRATA_REDIS_URL")
    )
    procs: list[subprocess.Popen[bytes]] = []
    try:
        texts = corpus_texts(args.corpus, args.limit)
        model_cps = await model_throughput(settings, texts)
        await ensure_topics(settings)
        ensure_dev_keys(settings, list(SERVICES))
        procs = start_services(settings)
        await asyncio.sleep(args.warmup_s)  # model load and group joins
        async with open_consumer(settings) as c:
            tps = [
                TopicPartition(T.DOCS_INDEXED, p) for p in await topic_partitions(c, T.DOCS_INDEXED)
            ]
        start_offsets = await true_end_offsets(settings, tps)
        corpus = limited_corpus(args.corpus, args.limit, home / "corpus.jsonl")
        t0 = time.perf_counter()
        summary = await ingest_paths(
            settings, [corpus], identity=f"client:{DEV_CLIENT}", wait=False
        )
        indexed = await follow_indexed(settings, start_offsets, summary.submitted, args.timeout_s)
        elapsed = time.perf_counter() - t0
    finally:
        stop_services(procs)
        if broker is not None:
            broker.stop()
    chunks = sum(e.count for e in indexed)
    lags = [e.index_lag_ms / 1000 for e in indexed]
    cps = chunks / elapsed
    return {
        "benchmark": "ingest",
        "machine": machine(),
        "corpus": str(args.corpus.name),
        "documents": summary.submitted,
        "documents_indexed": len(indexed),
        "chunks": chunks,
        "seconds": round(elapsed, 2),
        "chunks_per_s": round(cps, 1),
        "model_chunks_per_s": round(model_cps, 1),
        "ratio": round(cps / model_cps, 3),
        "index_lag_p50_s": round(statistics.median(lags), 3) if lags else None,
        "index_lag_p99_s": round(percentile(lags, 0.99), 3) if lags else None,
        "target_ratio_min": 0.9,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    parser.add_argument("--limit", type=int, default=5183, help="documents to ingest")
    parser.add_argument("--bootstrap")
    parser.add_argument("--warmup-s", type=float, default=15.0)
    parser.add_argument("--timeout-s", type=float, default=900.0)
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    result = asyncio.run(run(args))
    emit(result, args.output)


if __name__ == "__main__":
    main()
