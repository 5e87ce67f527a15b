"""The mesh producer's two ways into aiokafka land records alike: partition, order, metadata."""

from __future__ import annotations

import asyncio
from typing import Any

from aiokafka import AIOKafkaConsumer
from aiokafka.partitioner import murmur2

from stratamesh.bus import headers as H
from stratamesh.bus import topics as T
from stratamesh.bus.clients import consumer_config
from stratamesh.bus.producer import _MIN_BATCH
from stratamesh.events import RequestAdmitted
from stratamesh.events.testing import sample_event
from stratamesh.security.keys import Keyring
from stratamesh.security.signing import leaf_hash, verify_record
from tests.integration.conftest import Env

PARTITIONS = 3  # the env fixture's topics


async def _read(env: Env, expect: int) -> list[Any]:
    consumer = AIOKafkaConsumer(T.REQUESTS_ADMITTED, **consumer_config(env.settings, None))
    await consumer.start()
    records: list[Any] = []
    try:
        for _ in range(100):
            for recs in (await consumer.getmany(timeout_ms=200)).values():
                records.extend(recs)
            if len(records) >= expect:
                break
        return records
    finally:
        await consumer.stop()


async def test_batched_and_single_sends_agree_on_partition_order_and_metadata(env: Env) -> None:
    pub = await env.publisher("guard")
    calls = {"batch": 0, "one": 0}
    send_batch, send_one = pub.producer._send_batch, pub.producer._send_one

    async def counted_batch(*args: Any) -> None:
        calls["batch"] += 1
        await send_batch(*args)

    async def counted_one(*args: Any) -> None:
        calls["one"] += 1
        await send_one(*args)

    pub.producer._send_batch = counted_batch  # type: ignore[method-assign]
    pub.producer._send_one = counted_one  # type: ignore[method-assign]
    # One turn with many records per partition (the batch path), then a few lone records
    # (the per-record path), then many again: one key repeats across all three.
    waves = [
        [f"req-a{i}" for i in range(_MIN_BATCH * PARTITIONS * 3)],
        ["req-same", "req-b1", "req-b2"],
        ["req-same", *[f"req-c{i}" for i in range(_MIN_BATCH * PARTITIONS * 2)]],
    ]
    sent: list[tuple[str, str, Any]] = []  # (request id, event id, future)
    for wave in waves:
        for request_id in wave:
            event = sample_event(RequestAdmitted, request_id=request_id, tenant="acme")
            sent.append((request_id, event.event_id, pub.producer.send(pub.record(event))))
        await asyncio.sleep(0)  # end the turn: the producer takes the wave as one pass
    metas = await asyncio.gather(*(f for _, _, f in sent))
    assert calls["batch"] >= PARTITIONS and calls["one"] >= 3  # both paths were taken

    records = await _read(env, len(sent))
    assert len(records) == len(sent)
    by_id = {dict(r.headers)[H.EVENT_ID].decode(): r for r in records}
    keyring = Keyring.load(env.settings.keys_dir)
    for (request_id, event_id, _), meta in zip(sent, metas, strict=True):
        record = by_id[event_id]
        # Where aiokafka's DefaultPartitioner (Java's murmur2) puts the key, and where the
        # future said it went.
        assert record.partition == (murmur2(request_id.encode()) & 0x7FFFFFFF) % PARTITIONS
        assert (meta.topic, meta.partition, meta.offset) == (
            record.topic,
            record.partition,
            record.offset,
        )
        headers = dict(record.headers)
        leaf = leaf_hash(record.key, record.value, headers)
        verify_record(keyring, "guard", leaf, headers[H.SIGNATURE])
    # Within a partition, records are in sending order.
    order = {event_id: i for i, (_, event_id, _) in enumerate(sent)}
    for partition in range(PARTITIONS):
        mine = sorted((r for r in records if r.partition == partition), key=lambda r: r.offset)
        positions = [order[dict(r.headers)[H.EVENT_ID].decode()] for r in mine]
        assert positions == sorted(positions)
    counted = pub.producer._metrics.produced.labels("guard", T.REQUESTS_ADMITTED)
    assert counted._values[counted._key] >= len(sent)
