"""Offsets that are right on every Kafka-protocol broker: true end offsets, timestamp lookups.

Two broker answers cannot be taken at face value on the embedded Tansu broker, so this module
checks them against the records themselves (and costs the same on Apache Kafka, where the
answers are right):

* **End offsets.**  Tansu answers ListOffsets(latest) with the base offset of the last batch
  plus one, which is wrong whenever that batch held more than one record.  The high watermark
  carried by every *fetch* response is right, so :func:`true_end_offsets` seeks one record
  before the reported end, fetches once and takes the fetch response's high watermark: one
  round trip for all partitions, on any broker, whatever the reported value was.
* **Offsets for times.**  Tansu answers every ListOffsets(timestamp) with offset 0.
  :func:`offset_for_timestamp` asks the broker, reads the record at the answer and the one
  before it, and falls back to a binary search on record timestamps when the answer is wrong.

Tool consumers never join a group, never auto-commit and use ``auto_offset_reset="none"``: a
read outside the log raises instead of silently starting somewhere else.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka import errors as kerr
from aiokafka.structs import OffsetAndMetadata

from stratamesh.bus.clients import (
    CONNECTION_ERRORS,
    broker_errors,
    connect_timeout_s,
    consumer_config,
    unreachable,
)
from stratamesh.config import Settings
from stratamesh.errors import BrokerError

__all__ = [
    "DEFAULT_SKEW_MS",
    "ConsumerOrSettings",
    "OffsetBounds",
    "TopicNotFoundError",
    "commit_offsets",
    "iter_records",
    "offset_bounds",
    "offset_for_timestamp",
    "offsets_for_timestamp",
    "open_consumer",
    "require_partitions",
    "topic_partitions",
    "true_end_offsets",
]

# A started AIOKafkaConsumer (not subscribed to a group), or Settings to open a short-lived one.
ConsumerOrSettings = Any

# Producer CreateTime is only roughly ordered: records up to this much older than a record
# before them are still found by a timestamp lookup (see offset_for_timestamp).
DEFAULT_SKEW_MS = 1_000
# Upper bound on the records read backwards by the skew correction of a timestamp search.
_MAX_SKEW_SCAN = 10_000
_SKEW_SCAN_CHUNK = 500
_POLL_MS = 20


class TopicNotFoundError(BrokerError):
    """The topic does not exist on the broker (tools never create topics implicitly)."""


@contextlib.asynccontextmanager
async def open_consumer(settings: Settings, *, group_id: str | None = None) -> AsyncIterator[Any]:
    """A started tool consumer (manual assignment only), always stopped on exit.

    With ``group_id`` it can commit offsets for that group *without joining it*
    (``assign`` + ``commit``).  Raises :class:`BrokerError` within :func:`connect_timeout_s`
    when the broker does not answer.
    """
    consumer = AIOKafkaConsumer(**consumer_config(settings, group_id, tool=True))
    try:
        async with asyncio.timeout(connect_timeout_s(settings)):
            await consumer.start()
    except BaseException as exc:
        with contextlib.suppress(Exception):
            await consumer.stop()
        if isinstance(exc, (*CONNECTION_ERRORS, kerr.KafkaError)):
            raise unreachable(settings, exc) from exc
        raise
    try:
        async with broker_errors(settings, "reading offsets"):
            yield consumer
    finally:
        with contextlib.suppress(Exception):
            await consumer.stop()


@contextlib.asynccontextmanager
async def _using(source: ConsumerOrSettings) -> AsyncIterator[Any]:
    if isinstance(source, Settings):
        async with open_consumer(source) as consumer:
            yield consumer
    else:
        yield source


async def topic_partitions(consumer: Any, topic: str) -> list[int]:
    """The partition numbers of ``topic``; :class:`TopicNotFoundError` when it does not exist.

    Reads full cluster metadata instead of asking for the topic by name: a by-name metadata
    request auto-creates the topic on brokers that allow it (Tansu does).
    """
    await consumer.topics()
    parts = consumer.partitions_for_topic(topic)
    if not parts:
        raise TopicNotFoundError(
            f"topic {topic!r} does not exist; `strata topics list` shows the existing topics "
            "and `strata topics create` makes the registry ones"
        )
    return sorted(int(p) for p in parts)


@dataclass(frozen=True, slots=True)
class OffsetBounds:
    """The readable range ``[begin, end)`` of one partition.

    ``end`` is the true end (the high watermark of a fetch response); ``reported_end`` is
    what ListOffsets(latest) answered, kept for diagnostics.
    """

    begin: int
    end: int
    reported_end: int

    @property
    def count(self) -> int:
        return self.end - self.begin

    @property
    def reported_end_correct(self) -> bool:
        return self.reported_end == self.end


async def offset_bounds(
    source: ConsumerOrSettings, partitions: Iterable[TopicPartition]
) -> dict[TopicPartition, OffsetBounds]:
    """Beginning, true end and reported end offsets of ``partitions``.

    ``source`` is a started tool consumer or :class:`Settings`.  A consumer passed in is
    reassigned to ``partitions`` while this runs and given its previous assignment back
    afterwards, but its positions are lost: seek before reading again.  The topics must exist.
    """
    tps = list(dict.fromkeys(partitions))
    if not tps:
        return {}
    async with _using(source) as consumer:
        return await _bounds(consumer, tps)


async def true_end_offsets(
    source: ConsumerOrSettings, partitions: Iterable[TopicPartition]
) -> dict[TopicPartition, int]:
    """The offset after the last record of each partition, right on Tansu and on Kafka.

    Same contract as :func:`offset_bounds` (a consumer passed in loses its positions).
    """
    return {tp: b.end for tp, b in (await offset_bounds(source, partitions)).items()}


async def require_partitions(consumer: Any, tps: Iterable[TopicPartition]) -> None:
    """Raise :class:`TopicNotFoundError` unless every partition exists.

    Must precede any by-topic request (ListOffsets, assign, commit): those fetch metadata for
    the topic by name, which auto-creates a missing topic on Tansu.
    """
    await consumer.topics()
    for tp in tps:
        parts = consumer.partitions_for_topic(tp.topic)
        if not parts:
            raise TopicNotFoundError(
                f"topic {tp.topic!r} does not exist; `strata topics list` shows the existing topics"
            )
        if tp.partition not in parts:
            raise TopicNotFoundError(
                f"topic {tp.topic!r} has no partition {tp.partition} (it has {len(parts)})"
            )


async def _bounds(consumer: Any, tps: list[TopicPartition]) -> dict[TopicPartition, OffsetBounds]:
    await require_partitions(consumer, tps)
    begins = {tp: int(o) for tp, o in (await consumer.beginning_offsets(tps)).items()}
    reported = {tp: int(o) for tp, o in (await consumer.end_offsets(tps)).items()}
    # One record before the reported end: on Kafka this reads that single record and the
    # high watermark equals the reported end (the O(1) check); on Tansu the fetch returns the
    # last batch and the high watermark says where it really ends.
    probe = {tp: max(begins[tp], reported[tp] - 1) for tp in tps}
    highwater = await _fetch_highwaters(consumer, probe, begins)
    return {
        tp: OffsetBounds(begins[tp], max(begins[tp], highwater[tp]), reported[tp]) for tp in tps
    }


async def _fetch_highwaters(
    consumer: Any,
    positions: Mapping[TopicPartition, int],
    fallback: Mapping[TopicPartition, int],
    timeout_s: float = 30.0,
) -> dict[TopicPartition, int]:
    """Fetch once at ``positions`` and return each partition's fetch-response high watermark."""
    previous = set(consumer.assignment())
    consumer.assign(list(positions))
    for tp, offset in positions.items():
        consumer.seek(tp, offset)
    seen: dict[TopicPartition, int] = {}
    pending = set(positions)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    try:
        while pending:
            try:
                batch = await consumer.getmany(*pending, timeout_ms=_POLL_MS)
            except kerr.OffsetOutOfRangeError as exc:
                # The reported end lay beyond the log: fetch from the beginning instead.
                bad = exc.args[0] if exc.args and isinstance(exc.args[0], dict) else {}
                for tp in bad:
                    consumer.seek(tp, fallback[tp])
                if not bad:
                    raise
                continue
            for tp, records in batch.items():
                if records:
                    seen[tp] = max(seen.get(tp, 0), records[-1].offset + 1)
            for tp in list(pending):
                if consumer.highwater(tp) is not None:
                    pending.discard(tp)
            if pending and loop.time() > deadline:
                raise BrokerError(
                    f"the broker sent no fetch response for {sorted(map(str, pending))} "
                    f"within {timeout_s:.0f} s"
                )
        return {tp: max(int(consumer.highwater(tp)), seen.get(tp, 0)) for tp in positions}
    finally:
        if previous and previous != set(positions):
            consumer.assign(list(previous))


async def iter_records(
    consumer: Any, ranges: Mapping[TopicPartition, tuple[int, int]], *, idle_timeout_s: float = 30.0
) -> AsyncGenerator[tuple[TopicPartition, list[Any]], None]:
    """Yield ``(partition, records)`` chunks of every record in ``[start, stop)`` per partition.

    Records come in offset order within a partition.  The consumer is reassigned to the
    partitions of ``ranges``; ``stop`` must not exceed the true end (use :func:`offset_bounds`).
    Raises :class:`BrokerError` if no record arrives for ``idle_timeout_s``.
    """
    todo = {tp: (start, stop) for tp, (start, stop) in ranges.items() if stop > start}
    if not todo:
        return
    consumer.assign(list(todo))
    for tp, (start, _) in todo.items():
        consumer.seek(tp, start)
    loop = asyncio.get_running_loop()
    last_progress = loop.time()
    while todo:
        try:
            batch = await consumer.getmany(*todo, timeout_ms=100)
        except kerr.OffsetOutOfRangeError as exc:
            raise BrokerError(
                f"records were deleted while reading (retention?): {exc}; read again"
            ) from exc
        for tp, records in batch.items():
            if tp not in todo:
                continue
            stop = todo[tp][1]
            wanted = [r for r in records if r.offset < stop]
            if wanted:
                last_progress = loop.time()
                yield tp, wanted
        for tp in list(todo):
            # Past the stop offset (or past control records / compacted gaps before it).
            if tp in batch and batch[tp] and batch[tp][-1].offset + 1 >= todo[tp][1]:
                done = True
            else:
                done = int(await consumer.position(tp)) >= todo[tp][1]
            if done:
                consumer.pause(tp)
                del todo[tp]
                last_progress = loop.time()
        if todo and loop.time() - last_progress > idle_timeout_s:
            raise BrokerError(
                f"no records arrived for {idle_timeout_s:.0f} s while reading "
                f"{sorted(map(str, todo))}"
            )


async def _read_chunk(consumer: Any, tp: TopicPartition, start: int, stop: int) -> list[Any]:
    """The first chunk of records in ``[start, stop)`` (one fetch; empty if there are none)."""
    async with contextlib.aclosing(iter_records(consumer, {tp: (start, stop)})) as chunks:
        async for _, records in chunks:
            return records
    return []


async def _read_all(consumer: Any, tp: TopicPartition, start: int, stop: int) -> list[Any]:
    out: list[Any] = []
    async for _, records in iter_records(consumer, {tp: (start, stop)}):
        out.extend(records)
    return out


async def offset_for_timestamp(
    source: ConsumerOrSettings, tp: TopicPartition, ts_ms: int, *, skew_ms: int = DEFAULT_SKEW_MS
) -> int:
    """The earliest offset of ``tp`` whose record timestamp is ``>= ts_ms`` (the end if none).

    The broker is asked first (ListOffsets by timestamp) and its answer is *verified*: the
    record at the answer must be at or after ``ts_ms`` and the record before it earlier.
    Apache Kafka's answers pass this check, costing one small fetch.  A wrong answer (Tansu
    always says 0) is replaced by a binary search over record timestamps between the
    beginning and the true end.

    Timestamps are producer CreateTime, hence only roughly ordered.  Rule: the search finds a
    boundary ``b`` (``ts(b) >= ts_ms > ts(b-1)``), then walks backwards from ``b`` through the
    records whose timestamp is ``>= ts_ms - skew_ms`` and returns the earliest record among
    them with ``ts >= ts_ms``.  So the result is exact (the first record at or after
    ``ts_ms``, as Kafka defines it) whenever no record is more than ``skew_ms`` newer than a
    record after it; with larger disorder it is still a boundary as above.  The backward walk
    reads at most 10 000 records.
    """
    return (await offsets_for_timestamp(source, [tp], ts_ms, skew_ms=skew_ms))[tp]


async def offsets_for_timestamp(
    source: ConsumerOrSettings,
    partitions: Iterable[TopicPartition],
    ts_ms: int,
    *,
    skew_ms: int = DEFAULT_SKEW_MS,
) -> dict[TopicPartition, int]:
    """:func:`offset_for_timestamp` for several partitions at once (one broker round trip)."""
    tps = list(dict.fromkeys(partitions))
    if not tps:
        return {}
    ts_ms = max(0, int(ts_ms))  # before 1970: the beginning
    async with _using(source) as consumer:
        bounds = await _bounds(consumer, tps)
        try:
            answers = await consumer.offsets_for_times({tp: ts_ms for tp in tps})
        except kerr.KafkaError:  # e.g. UnsupportedVersionError: search instead
            answers = {}
        out: dict[TopicPartition, int] = {}
        for tp in tps:
            b = bounds[tp]
            if b.count == 0:
                out[tp] = b.end
                continue
            answer = answers.get(tp)
            claimed = None if answer is None else int(answer.offset)
            if await _verified(consumer, tp, claimed, ts_ms, b):
                out[tp] = b.end if claimed is None else min(max(claimed, b.begin), b.end)
            else:
                found = await _search(consumer, tp, ts_ms, b)
                out[tp] = await _skew_back(consumer, tp, ts_ms, b, found=found, skew_ms=skew_ms)
        return out


async def _verified(
    consumer: Any, tp: TopicPartition, claimed: int | None, ts_ms: int, b: OffsetBounds
) -> bool:
    if claimed is None or claimed >= b.end:
        # "No record at or after ts_ms": the last record must be older.
        last = await _read_chunk(consumer, tp, max(b.begin, b.end - 1), b.end)
        return not last or last[-1].timestamp < ts_ms
    if claimed < b.begin:
        return False
    records = await _read_chunk(consumer, tp, max(b.begin, claimed - 1), min(b.end, claimed + 1))
    before = [r for r in records if r.offset < claimed]
    at = [r for r in records if r.offset >= claimed]
    if not at or at[0].timestamp < ts_ms:
        return False
    return not before or before[-1].timestamp < ts_ms


async def _search(consumer: Any, tp: TopicPartition, ts_ms: int, b: OffsetBounds) -> int:
    """Binary search for a boundary, treating the partition as sorted by timestamp.

    Invariant: records before ``lo`` are older than ``ts_ms``; ``hi`` is at or after a record
    that is not (or is the end).  Every probe uses the whole chunk one fetch returns.
    """
    lo, hi = b.begin, b.end
    while lo < hi:
        mid = (lo + hi) // 2
        records = await _read_chunk(consumer, tp, mid, hi)
        if not records:  # nothing but gaps in [mid, hi)
            hi = mid
            continue
        idx = next((i for i, r in enumerate(records) if r.timestamp >= ts_ms), None)
        if idx is None:
            lo = records[-1].offset + 1
        elif idx == 0:
            hi = mid
        else:
            lo, hi = records[idx - 1].offset + 1, records[idx].offset
    return lo


async def _skew_back(
    consumer: Any, tp: TopicPartition, ts_ms: int, b: OffsetBounds, *, found: int, skew_ms: int
) -> int:
    if skew_ms <= 0:
        return found
    floor = ts_ms - skew_ms
    best, cursor, scanned = found, found, 0
    while cursor > b.begin and scanned < _MAX_SKEW_SCAN:
        start = max(b.begin, cursor - _SKEW_SCAN_CHUNK)
        records = await _read_all(consumer, tp, start, cursor)
        scanned += cursor - start
        cursor = start
        stop = False
        for r in reversed(records):
            if r.timestamp >= ts_ms:
                best = r.offset
            elif r.timestamp < floor:
                stop = True
                break
        if stop:
            break
    return best


async def commit_offsets(
    settings: Settings, group: str, offsets: Mapping[TopicPartition, int | tuple[int, str]]
) -> None:
    """Commit ``offsets`` (offset, or (offset, metadata)) for ``group`` without joining it.

    Uses a consumer with that ``group_id``, manual ``assign`` and an explicit ``commit``:
    accepted by Kafka while the group has no active member (and by Tansu).  Check
    :func:`stratamesh.bus.admin.group_is_active` first.
    """
    if not offsets:
        return
    payload = {
        tp: OffsetAndMetadata(v, "") if isinstance(v, int) else OffsetAndMetadata(v[0], v[1])
        for tp, v in offsets.items()
    }
    async with open_consumer(settings, group_id=group) as consumer:
        await require_partitions(consumer, payload)
        consumer.assign(list(payload))
        async with broker_errors(settings, f"committing offsets for group {group!r}"):
            await consumer.commit(payload)
