"""The mesh producer: encodes events, signs them in batches, and sends them with acks=all.

Every record sent in one event-loop turn is signed under one Merkle root (see
:mod:`stratamesh.security.signing`); the returned future resolves when the broker
acknowledged the record, which is what the consumer runtime waits for before it commits.

Why two ways into aiokafka: ``AIOKafkaProducer.send`` costs ~15 µs of Python per record
(a coroutine, a partitioner call and a future per record, each resolved through the event
loop) — as much as encoding and signing the record.  When one turn queues many records for
one partition, they go in as one ``BatchBuilder`` (``send_batch``: ~6 µs a record, one
future for the lot).  A few records, a record without a key, or a large one take the
per-record path, which keeps aiokafka's lingering (a lone record joins the partition's
open batch instead of making its own) and its size checks.  Both paths append to the same
per-partition queue in order, so records of one partition keep their order either way.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.partitioner import DefaultPartitioner
from aiokafka.structs import RecordMetadata

from stratamesh.bus import headers as H
from stratamesh.bus.clients import producer_config
from stratamesh.bus.tuning import tune_gc
from stratamesh.config import Settings
from stratamesh.errors import BrokerError
from stratamesh.obs.metrics import bus_metrics
from stratamesh.security.keys import SigningKey
from stratamesh.security.signing import MAX_BATCH, leaf_hash, sign_batch

__all__ = ["MeshProducer", "OutRecord"]

# Records of one partition in one send-loop pass from which a BatchBuilder pays off (its own
# future and queue slot cost about what a few per-record sends do).
_MIN_BATCH = 16
# Larger values take the per-record path: aiokafka checks their size there, and one
# oversized record must not fail the batch it would share.
_MAX_BATCHED_VALUE = 64 * 1024

_Pending = tuple["OutRecord", "asyncio.Future[RecordMetadata]"]


@dataclass(slots=True)
class OutRecord:
    """A record to send.  ``sign`` False passes key, value and headers through untouched."""

    topic: str
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]] = field(default_factory=list)
    partition: int | None = None
    sign: bool = True


class MeshProducer:
    def __init__(
        self, settings: Settings, signer: SigningKey | None, *, service: str = "client"
    ) -> None:
        self.settings = settings
        self.signer = signer
        self.service = service
        self._producer = AIOKafkaProducer(**producer_config(settings))
        self._pending: list[tuple[OutRecord, asyncio.Future[RecordMetadata]]] = []
        self._batches: asyncio.Queue[list[tuple[OutRecord, asyncio.Future[RecordMetadata]]]]
        self._batches = asyncio.Queue()
        self._kick_scheduled = False
        self._sender: asyncio.Task[None] | None = None
        self._metrics = bus_metrics()
        self._produced: dict[str, Any] = {}
        self._started = False
        self._inflight: set[asyncio.Future[RecordMetadata]] = set()
        # One entry per waiting flush: the futures it still waits for, and its wake-up.
        self._flushes: list[tuple[set[asyncio.Future[RecordMetadata]], asyncio.Future[None]]] = []
        # aiokafka's default, which producer_config keeps: the batch path must place keys
        # exactly where AIOKafkaProducer.send would.
        self._partitioner = DefaultPartitioner()

    async def start(self) -> None:
        tune_gc(self.settings.consumer.gc_gen0_threshold)
        try:
            await self._producer.start()
        except Exception as exc:
            await self._producer.stop()
            raise BrokerError(
                f"cannot reach the broker at {self.settings.bootstrap_servers}: {exc}; is it "
                "running? (STRATA_BOOTSTRAP_SERVERS)"
            ) from exc
        self._sender = asyncio.create_task(self._send_loop(), name=f"{self.service}-producer")
        self._started = True

    async def stop(self) -> None:
        if not self._started:
            return
        self._started = False
        await self.flush()
        if self._sender:
            self._sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sender
        await self._producer.stop()

    async def __aenter__(self) -> MeshProducer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def send(self, record: OutRecord) -> asyncio.Future[RecordMetadata]:
        """Queue a record; the future resolves with its metadata once the broker acked it."""
        if not self._started:
            raise BrokerError("the producer is not started")
        fut: asyncio.Future[RecordMetadata] = asyncio.get_running_loop().create_future()
        self._pending.append((record, fut))
        self._inflight.add(fut)
        fut.add_done_callback(self._settled)
        if not self._kick_scheduled:
            self._kick_scheduled = True
            asyncio.get_running_loop().call_soon(self._kick)
        return fut

    async def flush(self) -> None:
        """Wait until everything queued so far is acknowledged (or failed)."""
        self._kick()
        if not self._inflight:
            return
        # Not gather(): with tens of thousands in flight, a callback and a result slot per
        # future cost as much as sending them.  The futures report to _settled anyway.
        entry = (set(self._inflight), asyncio.get_running_loop().create_future())
        self._flushes.append(entry)
        try:
            await entry[1]
        finally:
            self._flushes.remove(entry)

    def _settled(self, fut: asyncio.Future[RecordMetadata]) -> None:
        self._inflight.discard(fut)
        for waiting, wake in self._flushes:
            waiting.discard(fut)
            if not waiting and not wake.done():
                wake.set_result(None)

    def _kick(self) -> None:
        self._kick_scheduled = False
        if self._pending:
            batch, self._pending = self._pending, []
            self._batches.put_nowait(batch)

    def _sign(self, batch: list[tuple[OutRecord, asyncio.Future[RecordMetadata]]]) -> None:
        to_sign = [r for r, _ in batch if r.sign]
        if not to_sign:
            return
        if self.signer is None:
            raise BrokerError("this producer has no signing key; every event must be signed")
        for i in range(0, len(to_sign), MAX_BATCH):
            chunk = to_sign[i : i + MAX_BATCH]
            leaves = [leaf_hash(r.key, r.value or b"", dict(r.headers)) for r in chunk]
            for record, sig in zip(chunk, sign_batch(self.signer, leaves), strict=True):
                record.headers.append((H.SIGNATURE, sig))

    async def _send_loop(self) -> None:
        while True:
            batch = await self._batches.get()
            while not self._batches.empty():  # turns queued while we were busy: one pass
                batch += self._batches.get_nowait()
            try:
                self._sign(batch)
            except Exception as exc:
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            await self._send(batch)

    async def _send(self, batch: list[_Pending]) -> None:
        groups: dict[tuple[str, int | None], list[_Pending]] = {}
        partitions: dict[str, list[int]] = {}
        for item in batch:
            record, fut = item
            partition = record.partition
            if partition is None and record.key is not None:
                all_partitions = partitions.get(record.topic)
                if all_partitions is None:
                    try:
                        known = await self._producer.partitions_for(record.topic)
                    except Exception as exc:
                        if not fut.done():
                            fut.set_exception(exc)
                        continue
                    all_partitions = partitions[record.topic] = sorted(known)
                partition = self._partitioner(record.key, all_partitions, all_partitions)
            groups.setdefault((record.topic, partition), []).append(item)
        for (topic, partition), items in groups.items():
            if (
                partition is not None
                and len(items) >= _MIN_BATCH
                and all(len(r.value or b"") <= _MAX_BATCHED_VALUE for r, _ in items)
            ):
                await self._send_batch(topic, partition, items)
                continue
            for record, fut in items:
                await self._send_one(record, fut, partition)

    async def _send_one(
        self, record: OutRecord, fut: asyncio.Future[RecordMetadata], partition: int | None
    ) -> None:
        try:
            kafka_fut = await self._producer.send(
                record.topic,
                record.value,
                key=record.key,
                headers=record.headers,
                partition=partition,
            )
        except Exception as exc:
            if not fut.done():
                fut.set_exception(exc)
            return
        kafka_fut.add_done_callback(self._chain(record.topic, fut))

    async def _send_batch(self, topic: str, partition: int, items: Sequence[_Pending]) -> None:
        """``items`` (all for ``topic``/``partition``, in order) as BatchBuilders."""
        start = 0
        while start < len(items):
            builder = self._producer.create_batch()
            offsets: list[tuple[asyncio.Future[RecordMetadata], int, int]] = []
            end = start
            while end < len(items):
                record, fut = items[end]
                meta = builder.append(
                    key=record.key, value=record.value, timestamp=None, headers=record.headers
                )
                if meta is None:  # full
                    break
                offsets.append((fut, meta.offset, meta.timestamp))
                end += 1
            if end == start:  # not even one fits an empty batch: let send() say why
                await self._send_one(items[start][0], items[start][1], partition)
                start += 1
                continue
            builder.close()  # drainable at once, not after the linger
            try:
                batch_fut = await self._producer.send_batch(builder, topic, partition=partition)
            except Exception as exc:
                for fut, _, _ in offsets:
                    if not fut.done():
                        fut.set_exception(copy.copy(exc))
            else:
                batch_fut.add_done_callback(self._fan_out(topic, offsets))
            start = end

    def _fan_out(
        self, topic: str, offsets: list[tuple[asyncio.Future[RecordMetadata], int, int]]
    ) -> Any:
        """Resolve each record's future from its batch's, as aiokafka does per record."""
        counter = self._counter(topic)

        def done(bf: asyncio.Future[RecordMetadata | None]) -> None:
            if bf.cancelled():
                for fut, _, _ in offsets:
                    fut.cancel()
                return
            exc = bf.exception()
            base = None if exc is not None else bf.result()
            for fut, offset, timestamp in offsets:
                if fut.done():
                    continue
                if exc is not None:
                    # One copy each, or every waiter's traceback grows on the shared one.
                    fut.set_exception(copy.copy(exc))
                    continue
                counter.inc()
                if base is None:  # acks=0: nothing to report
                    fut.set_result(None)
                    continue
                fut.set_result(
                    RecordMetadata(
                        base.topic,
                        base.partition,
                        base.topic_partition,
                        base.offset + offset,
                        timestamp if base.timestamp == -1 else base.timestamp,
                        base.timestamp_type,
                        base.log_start_offset,
                    )
                )

        return done

    def _counter(self, topic: str) -> Any:
        counter = self._produced.get(topic)
        if counter is None:
            counter = self._produced[topic] = self._metrics.produced.labels(self.service, topic)
        return counter

    def _chain(self, topic: str, fut: asyncio.Future[RecordMetadata]) -> Any:
        counter = self._counter(topic)

        def done(kf: asyncio.Future[RecordMetadata]) -> None:
            if fut.done():
                return
            if kf.cancelled():
                fut.cancel()
            elif (exc := kf.exception()) is not None:
                fut.set_exception(exc)
            else:
                counter.inc()
                fut.set_result(kf.result())

        return done
