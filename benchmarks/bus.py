"""Bus overhead: a bare aiokafka produce→consume hop against the same hop through stratamesh.

The mesh hop adds everything a service pays per record: Avro encoding, batched Ed25519
signing, signature verification, producer allow-list, decoding, idempotency look-up and
mark (Redis when STRATA_REDIS_URL is set, else the local SQLite store), the middleware,
metrics, and offset commits after acknowledgement.  Both hops run on the same broker with
the same client settings, in one run, so the ratios are meaningful on a noisy machine.

    python benchmarks/bus.py [--messages 20000] [--rate 500] [--bootstrap HOST:PORT]

Prints one JSON object on the last line: {"bare": {...}, "mesh": {...}, "ratios": {...}}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from stratamesh.bus import topics as T
from stratamesh.bus.admin import ensure_topics
from stratamesh.bus.middleware import Context
from stratamesh.bus.producer import producer_config
from stratamesh.bus.publish import Publisher
from stratamesh.bus.runtime import consumer_config
from stratamesh.bus.service import Service
from stratamesh.config import Settings
from stratamesh.embedded import EmbeddedBroker
from stratamesh.events import Priority, Query, RequestAdmitted, new_event_id
from stratamesh.security.keys import generate_identity

PARTITIONS = 3


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _summary(latencies_s: list[float], throughput: float) -> dict[str, float]:
    ms = [v * 1000 for v in latencies_s]
    return {"p50_ms": round(statistics.median(ms), 3), "p99_ms": round(_pct(ms, 0.99), 3),
            "msgs_per_s": round(throughput, 1)}


def _event(i: int) -> RequestAdmitted:
    """A typical small request event (~300 bytes encoded)."""
    return RequestAdmitted(
        event_id=new_event_id(), tenant="bench", occurred_at=datetime.now(UTC),
        producer="guard", request_id=f"req-{i}", priority=Priority.PRO,
        query=Query(prompt="What does the retention policy say about invoices older than "
                    "seven years, and who may approve an exception?"),
        guard_version="guard@bench",
    )


async def bare_hop(settings: Settings, topic: str, n: int, rate: float) -> dict[str, float]:
    producer = AIOKafkaProducer(**producer_config(settings))
    consumer = AIOKafkaConsumer(topic, **consumer_config(settings, f"bare-{uuid.uuid4().hex}"))
    await producer.start()
    await consumer.start()
    sent: dict[bytes, float] = {}
    latencies: list[float] = []
    received = 0
    target = [0]

    async def consume() -> None:
        nonlocal received
        while received < target[0]:
            batch = await consumer.getmany(timeout_ms=100)
            now = time.perf_counter()
            for records in batch.values():
                for r in records:
                    t0 = sent.pop(r.value[:16], None)
                    if t0 is not None:
                        latencies.append(now - t0)
                    received += 1
            if batch:
                await consumer.commit()

    payload = b"x" * 300
    await _wait_assigned(consumer)
    try:
        # latency at a steady rate
        target[0] = received + min(n, int(rate * 5))
        task = asyncio.create_task(consume())
        for i in range(target[0]):
            tag = uuid.uuid4().bytes
            sent[tag] = time.perf_counter()
            await producer.send(topic, tag + payload, key=str(i).encode())
            await asyncio.sleep(1 / rate)
        await task
        lat = list(latencies)
        # throughput: as fast as possible
        start_count = received
        target[0] = received + n
        t0 = time.perf_counter()
        task = asyncio.create_task(consume())
        for i in range(n):
            await producer.send(topic, uuid.uuid4().bytes + payload, key=str(i).encode())
        await task
        elapsed = time.perf_counter() - t0
        return _summary(lat, (received - start_count) / elapsed)
    finally:
        await consumer.stop()
        await producer.stop()


async def _wait_assigned(consumer: AIOKafkaConsumer) -> None:
    for _ in range(400):  # aiokafka has no event for "assigned"; poll for it, 20 s at most
        if consumer.assignment():
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.2)


async def mesh_hop(settings: Settings, n: int, rate: float) -> dict[str, float]:
    sent: dict[str, float] = {}
    latencies: list[float] = []
    handled = [0]
    done = asyncio.Event()
    target = [0]

    async def handler(event: RequestAdmitted, ctx: Context) -> None:
        t0 = sent.pop(event.event_id, None)
        if t0 is not None:
            latencies.append(time.perf_counter() - t0)
        handled[0] += 1
        if handled[0] >= target[0]:
            done.set()

    svc = Service("route", group=f"bench-{uuid.uuid4().hex}")
    svc.subscribe(T.REQUESTS_ADMITTED)(handler)
    await svc.start(settings)
    assert svc.runtime is not None
    await svc.runtime.assigned.wait()
    await asyncio.sleep(0.2)
    pub = Publisher(settings, "guard")
    await pub.__aenter__()
    try:
        count = min(n, int(rate * 5))
        target[0] = count
        for i in range(count):
            ev = _event(i)
            sent[ev.event_id] = time.perf_counter()
            pub.producer.send(pub.record(ev))
            await asyncio.sleep(1 / rate)
        await done.wait()
        lat = list(latencies)
        events = [_event(i) for i in range(n)]
        done.clear()
        handled[0] = 0
        target[0] = n
        t0 = time.perf_counter()
        for ev in events:
            pub.producer.send(pub.record(ev))
            if len(pub.producer._pending) >= 500:
                await asyncio.sleep(0)
        await done.wait()
        elapsed = time.perf_counter() - t0
        return _summary(lat, n / elapsed)
    finally:
        await pub.__aexit__(None, None, None)
        await svc.stop()


async def main() -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--rate", type=float, default=500.0, help="msgs/s for latency")
    parser.add_argument("--bootstrap", help="use this broker instead of an embedded one")
    parser.add_argument("--output", type=Path, help="also write the JSON here")
    args = parser.parse_args()

    broker = None
    bootstrap = args.bootstrap
    if bootstrap is None:
        broker = EmbeddedBroker()
        broker.start()
        bootstrap = broker.bootstrap
    home = Path(tempfile.mkdtemp(prefix="strata-bench-"))
    settings = Settings(home=home, bootstrap_servers=bootstrap,
                        redis_url=os.environ.get("STRATA_REDIS_URL"),
                        consumer={"session_timeout_ms": 6000,  # type: ignore[arg-type]
                                  "heartbeat_interval_ms": 500})
    try:
        await ensure_topics(settings, partitions=PARTITIONS)
        from stratamesh.bus.admin import create_topic

        await create_topic(settings, "bench.bare", partitions=PARTITIONS)
        for identity in ("guard", "route"):
            generate_identity(settings.keys_dir, identity)
        bare = await bare_hop(settings, "bench.bare", args.messages, args.rate)
        mesh = await mesh_hop(settings, args.messages, args.rate)
    finally:
        if broker is not None:
            broker.stop()
    result = {
        "benchmark": "bus",
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                    "platform": platform.platform()},
        "broker": "embedded tansu" if broker else bootstrap,
        "idempotency": "redis" if settings.redis_url else "sqlite",
        "messages": args.messages, "latency_rate_per_s": args.rate,
        "bare": bare, "mesh": mesh,
        "ratios": {"p99": round(mesh["p99_ms"] / bare["p99_ms"], 3),
                   "throughput": round(mesh["msgs_per_s"] / bare["msgs_per_s"], 3)},
        "targets": {"p99_ratio_max": 2.0, "throughput_ratio_min": 0.5},
    }
    if args.output:
        args.output.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    res = asyncio.run(main())
    sys.stdout.write(json.dumps(res) + "\n")
