"""The mesh producer: encodes events, signs them in batches, and sends them with acks=all.

Every record sent in one event-loop turn is signed under one Merkle root (see
:mod:`stratamesh.security.signing`); the returned future resolves when the broker
acknowledged the record, which is what the consumer runtime waits for before it commits.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaProducer
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
            try:
                self._sign(batch)
            except Exception as exc:
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            for record, fut in batch:
                try:
                    kafka_fut = await self._producer.send(
                        record.topic,
                        record.value,
                        key=record.key,
                        headers=record.headers,
                        partition=record.partition,
                    )
                except Exception as exc:
                    if not fut.done():
                        fut.set_exception(exc)
                    continue
                kafka_fut.add_done_callback(self._chain(record.topic, fut))

    def _chain(self, topic: str, fut: asyncio.Future[RecordMetadata]) -> Any:
        counter = self._produced.get(topic)
        if counter is None:
            counter = self._produced[topic] = self._metrics.produced.labels(self.service, topic)

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
