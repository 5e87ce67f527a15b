"""Bus overhead: a bare aiokafka produce→consume hop against the same hop through stratamesh.

A hop is what happens between two services: a producer process publishes, a consumer
process receives.  The bare hop sends 300-byte values with aiokafka and consumes them with a
plain consumer group (commit per batch).  The mesh hop publishes a typical small event
through the stratamesh publisher (Avro encoding, batched Ed25519 signing) and consumes it
with a stratamesh service: signature and allow-list check, decoding, idempotency look-up and
mark (Redis when STRATA_REDIS_URL is set, else the local SQLite store), deadline, metrics,
log context, offsets committed after acknowledgement.  Same broker, same client settings,
one run, so the ratios are meaningful on a noisy machine.

Two phases per hop: latency at a steady rate (send → handler, p50/p99), then throughput
(as fast as the producer can publish; messages handled per second).

    python benchmarks/bus.py [--messages 20000] [--rate 500] [--bootstrap HOST:PORT]

Prints one JSON object on the last line: {"bare": {...}, "mesh": {...}, "ratios": {...}}.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from _report import emit, machine, percentile
from stratamesh.bus import topics as T
from stratamesh.bus.admin import create_topic, ensure_topics
from stratamesh.bus.clients import consumer_config, producer_config
from stratamesh.bus.middleware import Context
from stratamesh.bus.publish import Publisher
from stratamesh.bus.service import Service
from stratamesh.config import Settings
from stratamesh.embedded import EmbeddedBroker
from stratamesh.events import Priority, Query, RequestAdmitted, new_event_id
from stratamesh.security.keys import generate_identity

PARTITIONS = 3
BARE_TOPIC = "bench.bare"
SENT_NS = "sent_ns"


def _summary(latencies_ms: list[float], throughput: float) -> dict[str, float]:
    return {
        "p50_ms": round(statistics.median(latencies_ms), 3),
        "p99_ms": round(percentile(latencies_ms, 0.99), 3),
        "msgs_per_s": round(throughput, 1),
    }


def _event(i: int) -> RequestAdmitted:
    """A typical small request event (~250 bytes encoded)."""
    return RequestAdmitted(
        event_id=new_event_id(),
        tenant="bench",
        occurred_at=datetime.now(UTC),
        producer="guard",
        request_id=f"req-{i}",
        priority=Priority.PRO,
        query=Query(
            prompt="What does the retention policy say about invoices older than "
            "seven years, and who may approve an exception?"
        ),
        guard_version="guard@bench",
        client_metadata={SENT_NS: str(time.time_ns())},
    )


# -- producer side (a child process) -----------------------------------------------------


async def produce(settings: Settings, mode: str, count: int, rate: float) -> None:
    """Publish ``count`` records (``rate`` per second, 0 = as fast as possible)."""
    interval = 1 / rate if rate else 0.0
    print(f"start {time.time_ns()}", flush=True)
    if mode == "bare":
        producer = AIOKafkaProducer(**producer_config(settings))
        await producer.start()
        futures = []
        payload = b"x" * 292
        for i in range(count):
            value = time.time_ns().to_bytes(8, "big") + payload
            futures.append(await producer.send(BARE_TOPIC, value, key=str(i).encode()))
            if interval:
                await asyncio.sleep(interval)
        await asyncio.gather(*futures)
        await producer.stop()
        return
    async with Publisher(settings, "guard") as pub:
        for i in range(count):
            pub.producer.send(pub.record(_event(i)))
            if interval:
                await asyncio.sleep(interval)
            elif i % 256 == 0:
                await asyncio.sleep(0)  # let the signer and the client run
        await pub.producer.flush()


def _spawn(settings: Settings, mode: str, count: int, rate: float) -> subprocess.Popen[str]:
    env = {
        **os.environ,
        "STRATA_HOME": str(settings.home),
        "STRATA_BOOTSTRAP_SERVERS": settings.bootstrap_servers or "",
    }
    return subprocess.Popen(
        [
            sys.executable,
            __file__,
            "--role",
            "producer",
            "--mode",
            mode,
            "--messages",
            str(count),
            "--rate",
            str(rate),
        ],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )


def _start_ns(proc: subprocess.Popen[str]) -> int:
    assert proc.stdout is not None
    line = proc.stdout.readline().split()
    return int(line[1])


# -- consumer side -----------------------------------------------------------------------


class Receiver:
    """Counts arrivals and send→arrival latency; wakes a waiter at a target count."""

    def __init__(self) -> None:
        self.latencies_ms: list[float] = []
        self.count = 0
        self.last_ns = 0
        self.target = 0
        self.reached = asyncio.Event()

    def arrived(self, sent_ns: int) -> None:
        now = time.time_ns()
        self.latencies_ms.append((now - sent_ns) / 1e6)
        self.count += 1
        self.last_ns = now
        if self.count >= self.target:
            self.reached.set()

    async def phase(
        self, settings: Settings, mode: str, count: int, rate: float
    ) -> tuple[list[float], float]:
        self.latencies_ms, self.count, self.target = [], 0, count
        self.reached.clear()
        proc = _spawn(settings, mode, count, rate)
        start = await asyncio.to_thread(_start_ns, proc)
        await asyncio.wait_for(self.reached.wait(), timeout=300)
        await asyncio.to_thread(proc.wait)
        return self.latencies_ms, count / ((self.last_ns - start) / 1e9)


async def bare_hop(settings: Settings, n: int, rate: float) -> dict[str, float]:
    rx = Receiver()
    consumer = AIOKafkaConsumer(BARE_TOPIC, **consumer_config(settings, f"bare-{uuid.uuid4()}"))
    await consumer.start()

    async def consume() -> None:
        while True:
            batch = await consumer.getmany(timeout_ms=100)
            for records in batch.values():
                for r in records:
                    rx.arrived(int.from_bytes(r.value[:8], "big"))
            if batch:
                await consumer.commit()

    task = asyncio.create_task(consume())
    try:
        for _ in range(400):  # aiokafka has no event for "assigned"; poll, 20 s at most
            if consumer.assignment():
                break
            await asyncio.sleep(0.05)
        latencies, _ = await rx.phase(settings, "bare", int(rate * 5), rate)
        _, throughput = await rx.phase(settings, "bare", n, 0)
        return _summary(latencies, throughput)
    finally:
        task.cancel()
        await consumer.stop()


async def mesh_hop(settings: Settings, n: int, rate: float) -> dict[str, float]:
    rx = Receiver()

    async def handler(event: RequestAdmitted, ctx: Context) -> None:
        rx.arrived(int(event.client_metadata[SENT_NS]))

    svc = Service("route", group=f"bench-{uuid.uuid4()}")
    svc.subscribe(T.REQUESTS_ADMITTED)(handler)
    await svc.start(settings)
    assert svc.runtime is not None
    try:
        await svc.runtime.assigned.wait()
        latencies, _ = await rx.phase(settings, "mesh", int(rate * 5), rate)
        _, throughput = await rx.phase(settings, "mesh", n, 0)
        return _summary(latencies, throughput)
    finally:
        await svc.stop()


async def run(args: argparse.Namespace) -> dict[str, Any]:
    broker = None
    bootstrap = args.bootstrap
    if bootstrap is None:
        broker = EmbeddedBroker()
        broker.start()
        bootstrap = broker.bootstrap
    settings = Settings(
        home=Path(tempfile.mkdtemp(prefix="strata-bench-")),
        bootstrap_servers=bootstrap,
        redis_url=os.environ.get("STRATA_REDIS_URL"),
        consumer={
            "session_timeout_ms": 6000,  # type: ignore[arg-type]
            "heartbeat_interval_ms": 500,
        },
    )
    try:
        await ensure_topics(
            settings, [T.REQUESTS_ADMITTED, T.dlq_of(T.REQUESTS_ADMITTED)], partitions=PARTITIONS
        )
        await create_topic(settings, BARE_TOPIC, PARTITIONS)
        for identity in ("guard", "route"):
            generate_identity(settings.keys_dir, identity)
        bare = await bare_hop(settings, args.messages, args.rate)
        mesh = await mesh_hop(settings, args.messages, args.rate)
    finally:
        if broker is not None:
            broker.stop()
    return {
        "benchmark": "bus",
        "machine": machine(),
        "broker": "embedded tansu" if broker else bootstrap,
        "idempotency": "redis" if settings.redis_url else "sqlite",
        "messages": args.messages,
        "latency_rate_per_s": args.rate,
        "bare": bare,
        "mesh": mesh,
        "ratios": {
            "p99": round(mesh["p99_ms"] / bare["p99_ms"], 3),
            "throughput": round(mesh["msgs_per_s"] / bare["msgs_per_s"], 3),
        },
        "targets": {"p99_ratio_max": 2.0, "throughput_ratio_min": 0.5},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--rate", type=float, default=500.0, help="msgs/s for latency")
    parser.add_argument("--bootstrap", help="use this broker instead of an embedded one")
    parser.add_argument("--output", type=Path, help="also write the JSON here")
    parser.add_argument(
        "--role", choices=["bench", "producer"], default="bench", help=argparse.SUPPRESS
    )
    parser.add_argument("--mode", choices=["bare", "mesh"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "producer":
        asyncio.run(produce(Settings(), args.mode, args.messages, args.rate))
        return
    result = asyncio.run(run(args))
    emit(result, args.output)


if __name__ == "__main__":
    main()
