"""The Kafka runtime: one consumer per service, one worker ("lane") per assigned partition.

Why lanes: a record whose handler is backing off before a retry must not hold up the other
partitions.  Each partition's records are handled in order by its own task; the fetch loop
keeps feeding the others and pauses only a partition whose buffer is full.

Why one consumer for all of a service's topics: a consumer per topic (members of the same
group with their own subscriptions) was measured.  Tansu delivers late to a fetch that spans
several busy topics (plain aiokafka relays, 50 ms fetch wait, 20 records/s: 8 ms per hop with
a consumer per topic, 18 ms when each also reads two other busy topics), and in the mesh it
cut the bus share of guard's hops from ~25 to ~11 ms at 10 requests/s — but every idle
consumer polls: idle CPU went from 5% + 9% (process + broker) to 17% + 35%, and the mesh
saturated at ~80 instead of ~100 requests/s (benchmarks/mesh.py).  Throughput won.

Why the commit tracker: outputs are sent without waiting, so a lane can move on while the
broker acknowledges; the offset of a partition is committed only up to the first record
whose outputs are not all acknowledged yet, and after those events were marked handled.
A crash therefore re-delivers, and never skips, a record; re-delivered records are skipped
by the idempotency marks or produce the same output ids again (DESIGN.md §2, Delivery).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.structs import OffsetAndMetadata, RecordMetadata

from stratamesh.bus.clients import consumer_config
from stratamesh.bus.middleware import DeadLettered, Handled, InRecord, Outcome, Pipeline
from stratamesh.bus.producer import MeshProducer, OutRecord
from stratamesh.bus.tuning import tune_gc
from stratamesh.config import Settings
from stratamesh.errors import BrokerError

__all__ = ["KafkaRuntime", "consumer_config"]

log = structlog.get_logger("stratamesh.bus")

_MAX_SEND_FAILURES = 5
_MAX_UNACKED_PER_LANE = 10_000


@dataclass(slots=True)
class _Track:
    offset: int
    outputs: list[OutRecord]
    futures: list[asyncio.Future[RecordMetadata]]
    mark: str | None
    failures: int = 0


@dataclass(slots=True)
class _Lane:
    tp: TopicPartition
    queue: deque[Any] = field(default_factory=deque)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    unacked: deque[_Track] = field(default_factory=deque)
    task: asyncio.Task[None] | None = None
    paused: bool = False
    stopping: bool = False
    committed: int | None = None
    first: int | None = None  # offset of the first record fetched since the assignment


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, runtime: KafkaRuntime) -> None:
        self.runtime = runtime

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self.runtime._revoke(revoked)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self.runtime._assign(assigned)


class KafkaRuntime:
    """Drives a :class:`Pipeline` from a Kafka consumer group and sends its outputs."""

    def __init__(
        self, settings: Settings, pipeline: Pipeline, producer: MeshProducer, topics: Sequence[str]
    ) -> None:
        self.settings = settings
        self.pipeline = pipeline
        self.producer = producer
        self.topics = list(topics)
        self._consumer = AIOKafkaConsumer(**consumer_config(settings, pipeline.group))
        self._lanes: dict[TopicPartition, _Lane] = {}
        self._commit_lock = asyncio.Lock()
        self._tasks: list[asyncio.Task[None]] = []
        self._running = False
        self._failed: BaseException | None = None
        self._metrics = pipeline.metrics
        self.assigned = asyncio.Event()

    # -- life cycle ---------------------------------------------------------------------

    async def start(self) -> None:
        tune_gc(self.settings.consumer.gc_gen0_threshold)
        try:
            await self._consumer.start()
        except Exception as exc:
            await self._consumer.stop()
            raise BrokerError(
                f"cannot reach the broker at {self.settings.bootstrap_servers}: {exc}"
            ) from exc
        self._consumer.subscribe(self.topics, listener=_Rebalance(self))
        self._running = True
        name = self.pipeline.service
        self._tasks = [
            asyncio.create_task(self._fetch_loop(), name=f"{name}-fetch"),
            asyncio.create_task(self._commit_loop(), name=f"{name}-commit"),
        ]

    async def wait(self) -> None:
        """Return when the runtime stopped; re-raise what made it stop, if anything."""
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._failed is not None:
            raise self._failed

    async def stop(self) -> None:
        """Stop fetching, let lanes finish their in-flight record, commit, leave the group."""
        if not self._running:
            return
        self._running = False
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._revoke(set(self._lanes))
        await self._consumer.stop()

    # -- partitions ---------------------------------------------------------------------

    def _assign(self, assigned: set[TopicPartition]) -> None:
        for tp in assigned:
            if tp not in self._lanes:
                lane = _Lane(tp)
                lane.task = asyncio.create_task(
                    self._lane_loop(lane), name=f"lane-{tp.topic}-{tp.partition}"
                )
                self._lanes[tp] = lane
        if assigned:
            self.assigned.set()
        log.info("partitions assigned", count=len(assigned), group=self.pipeline.group)

    async def _revoke(self, revoked: set[TopicPartition]) -> None:
        lanes = [self._lanes[tp] for tp in revoked if tp in self._lanes]
        if not lanes:
            return
        drain = self.settings.consumer.drain_timeout_s
        # Let each lane finish the record it is handling, then stop it.
        for lane in lanes:
            lane.stopping = True
            lane.queue.clear()
            lane.wake.set()
        tasks = [lane.task for lane in lanes if lane.task is not None]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=drain)
            for t in pending:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        futures = [f for lane in lanes for t in lane.unacked for f in t.futures]
        if futures:
            await asyncio.wait(futures, timeout=drain)
        await self._commit(lanes)
        for lane in lanes:
            self._lanes.pop(lane.tp, None)
            with contextlib.suppress(KeyError):
                self._metrics.lag.remove(
                    self.pipeline.service,
                    self.pipeline.group,
                    lane.tp.topic,
                    str(lane.tp.partition),
                )
        log.info("partitions revoked", count=len(lanes), group=self.pipeline.group)

    # -- loops --------------------------------------------------------------------------

    async def _fetch_loop(self) -> None:
        c = self.settings.consumer
        try:
            while self._running:
                batches = await self._consumer.getmany(
                    timeout_ms=100, max_records=c.max_poll_records
                )
                for tp, records in batches.items():
                    lane = self._lanes.get(tp)
                    if lane is None:
                        continue  # revoked while the fetch was in flight
                    if lane.first is None and records:
                        lane.first = records[0].offset
                    lane.queue.extend(records)
                    lane.wake.set()
                    if len(lane.queue) >= c.partition_buffer and not lane.paused:
                        self._consumer.pause(tp)
                        lane.paused = True
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.error("fetch loop failed", error=repr(exc))
            self._failed = exc
            self._running = False

    async def _lane_loop(self, lane: _Lane) -> None:
        limit = self.settings.consumer.max_poll_records
        resume_below = self.settings.consumer.partition_buffer // 2
        sub = self.pipeline.subscriptions.get(lane.tp.topic)
        batch_size = sub.batch_size if sub is not None and sub.batched else 0
        while not lane.stopping:
            if not lane.queue:
                lane.wake.clear()
                await lane.wake.wait()
                continue
            if batch_size:
                await self._fill(lane, batch_size, sub.batch_wait_ms if sub else 0)
                chunk = [lane.queue.popleft() for _ in range(min(batch_size, len(lane.queue)))]
                prepared = await self.pipeline.prepare(chunk)
                for item, outcome in zip(
                    prepared, await self.pipeline.run_batch(prepared), strict=True
                ):
                    self._emit(lane, item.record, outcome)
            else:
                chunk = [lane.queue.popleft() for _ in range(min(limit, len(lane.queue)))]
                for item in await self.pipeline.prepare(chunk):
                    if lane.stopping:
                        return  # the rest is redelivered to the partition's next owner
                    self._emit(lane, item.record, await self.pipeline.run(item))
                    if len(lane.unacked) > _MAX_UNACKED_PER_LANE:
                        await asyncio.wait(lane.unacked[0].futures)
            if lane.paused and len(lane.queue) < resume_below and lane.tp in self._lanes:
                self._consumer.resume(lane.tp)
                lane.paused = False

    @staticmethod
    async def _fill(lane: _Lane, size: int, wait_ms: int) -> None:
        """Wait up to ``wait_ms`` for the lane to hold ``size`` records (a fuller batch)."""
        deadline = time.monotonic() + wait_ms / 1000
        while len(lane.queue) < size and not lane.stopping:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            lane.wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(lane.wake.wait(), remaining)

    def _emit(self, lane: _Lane, record: InRecord, outcome: Outcome) -> None:
        if isinstance(outcome, Handled):
            outputs, mark = outcome.outputs, outcome.event_id
        elif isinstance(outcome, DeadLettered):
            outputs, mark = [outcome.record], None
        else:
            outputs, mark = [], None
        futures = [self.producer.send(o) for o in outputs]
        lane.unacked.append(_Track(record.offset, outputs, futures, mark))

    async def _commit_loop(self) -> None:
        interval = self.settings.consumer.commit_interval_ms / 1000
        try:
            while self._running:
                await asyncio.sleep(interval)
                await self._commit(list(self._lanes.values()))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.error("commit loop failed", error=repr(exc))
            self._failed = exc
            self._running = False
            for t in self._tasks:
                if t is not asyncio.current_task():
                    t.cancel()

    async def _commit(self, lanes: list[_Lane]) -> None:
        async with self._commit_lock:
            offsets: dict[TopicPartition, OffsetAndMetadata] = {}
            marks: list[str] = []
            for lane in lanes:
                done = self._acked_prefix(lane, marks)
                if done is not None:
                    offsets[lane.tp] = OffsetAndMetadata(done + 1, "")
            if marks:
                # Mark before committing: after a crash in between, the record is redelivered
                # and skipped as a duplicate rather than handled twice.
                await self.pipeline.idempotency.mark(self.pipeline.group, marks)
            if offsets:
                await self._consumer.commit(offsets)
                for lane in lanes:
                    if lane.tp in offsets:
                        lane.committed = offsets[lane.tp].offset
            self._report_lag(lanes)

    def _acked_prefix(self, lane: _Lane, marks: list[str]) -> int | None:
        done: int | None = None
        while lane.unacked:
            track = lane.unacked[0]
            # Most records have one output or none: skip the generic checks for those.
            failed: list[tuple[OutRecord, asyncio.Future[RecordMetadata]]] = []
            if track.futures:
                if not all(f.done() for f in track.futures):
                    break
                failed = [
                    (o, f)
                    for o, f in zip(track.outputs, track.futures, strict=True)
                    if f.cancelled() or f.exception() is not None
                ]
            if failed:
                track.failures += 1
                if track.failures > _MAX_SEND_FAILURES:
                    raise BrokerError(
                        f"cannot deliver outputs of {lane.tp} offset "
                        f"{track.offset}: {failed[0][1].exception()!r}"
                    )
                log.warning(
                    "output not acknowledged, resending",
                    offset=track.offset,
                    attempt=track.failures,
                )
                track.futures = [
                    self.producer.send(o) if (o, f) in failed else f
                    for o, f in zip(track.outputs, track.futures, strict=True)
                ]
                break
            lane.unacked.popleft()
            if track.mark:
                marks.append(track.mark)
            done = track.offset
        return done

    def _report_lag(self, lanes: list[_Lane]) -> None:
        """``strata_consumer_lag``: the partition's high watermark minus what this group has
        committed there.

        Before this member's first commit on a partition, what it resumed from stands in
        for the committed offset: the first fetched record's offset (the group's committed
        position, or where the reset policy started), else — nothing fetched, the fetch
        position is at the end — no lag.  A member stuck on its first record therefore
        shows its whole backlog, not nothing.
        """
        for lane in lanes:
            # The high watermark of fetch responses is right on Tansu, unlike ListOffsets.
            hw = self._consumer.highwater(lane.tp)
            if hw is None:
                continue
            base = lane.committed if lane.committed is not None else lane.first
            lag = 0 if base is None else max(hw - base, 0)
            self._metrics.lag.labels(
                self.pipeline.service, self.pipeline.group, lane.tp.topic, str(lane.tp.partition)
            ).set(lag)

    @property
    def consumers(self) -> list[AIOKafkaConsumer]:
        """The service's consumers (one, for all its topics: see the module docstring)."""
        return [self._consumer]

    async def drained(self) -> bool:
        """True when nothing is buffered, in flight or uncommitted (used by tests and tools)."""
        return all(not lane.queue and not lane.unacked for lane in self._lanes.values())
