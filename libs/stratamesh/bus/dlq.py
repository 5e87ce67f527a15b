"""Dead-letter queues: list, read and redrive them (`strata dlq ls|show|redrive`).

A DLQ record (DESIGN.md §2) carries the failed record's key and value bytes unchanged, its
original headers (signature included) and the ``strata-dlt-*`` headers plus
``strata-attempt`` added by the consumer middleware.  :func:`redrive` re-publishes the
original record: same key and value bytes, the original headers in their original order
(every ``strata-dlt-*`` header and ``strata-attempt`` removed, nothing else touched, so the
producer's signature still verifies), to the original topic and partition.

Redrive progress lives in a consumer group (default ``strata-dlq-redrive``) that is never
joined: its committed offset on a DLQ partition means "everything before was redriven".
Records redriven one by one ahead of that offset are listed in the commit metadata
(``strata-redriven:<ranges>``) where the broker keeps it; Tansu drops commit metadata, so
there a later ``all`` redrive re-publishes them (harmless: handlers are idempotent by event
id), and the result carries a warning saying so.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog
from aiokafka import TopicPartition

from stratamesh.bus import headers as hdr
from stratamesh.bus.admin import committed_offsets, list_topics, open_producer
from stratamesh.bus.clients import broker_errors
from stratamesh.bus.offsets import (
    TopicNotFoundError,
    iter_records,
    offset_bounds,
    open_consumer,
)
from stratamesh.bus.topics import DLQ_SUFFIX, dlq_of
from stratamesh.config import Settings
from stratamesh.errors import ConfigError
from stratamesh.obs.metrics import bus_metrics

__all__ = [
    "DEFAULT_REDRIVE_GROUP",
    "DlqRecord",
    "DlqSummary",
    "DltHeaders",
    "RedriveResult",
    "SkippedRecord",
    "dlq_topic_name",
    "list_dlq",
    "original_headers",
    "read_dlq",
    "redrive",
    "sample_dlq_depth",
    "watch_dlq_depth",
]

log = structlog.get_logger("stratamesh.bus")

DEFAULT_REDRIVE_GROUP = "strata-dlq-redrive"
_LEDGER_PREFIX = "strata-redriven:"
_LEDGER_MAX_CHARS = 3_000  # Kafka's offset.metadata.max.bytes defaults to 4096
_INT = re.compile(rb"\s*-?\d+\s*")

Header = tuple[str, bytes]


def dlq_topic_name(topic_name: str) -> str:
    """``results`` → ``results.dlq``; a DLQ name is returned unchanged."""
    return topic_name if topic_name.endswith(DLQ_SUFFIX) else dlq_of(topic_name)


def _text(value: bytes | None) -> str | None:
    return None if value is None else value.decode("utf-8", "replace")


def _int(value: bytes | None) -> int | None:
    """ASCII decimal (what the mesh writes) or a 4/8-byte big-endian int (Spring Kafka)."""
    if not value:
        return None
    if _INT.fullmatch(value):
        return int(value)
    if len(value) in (4, 8):
        return int.from_bytes(value, "big", signed=True)
    return None


@dataclass(frozen=True, slots=True)
class DltHeaders:
    """The dead-letter headers of a DLQ record, decoded (None when absent)."""

    original_topic: str | None = None
    original_partition: int | None = None
    original_offset: int | None = None
    original_timestamp: int | None = None
    original_consumer_group: str | None = None
    exception_fqcn: str | None = None
    exception_message: str | None = None
    exception_stacktrace: str | None = None
    failure_class: str | None = None
    service: str | None = None
    attempt: int | None = None

    @classmethod
    def from_headers(cls, headers: Iterable[Header]) -> DltHeaders:
        h = hdr.header_dict(list(headers))
        return cls(
            original_topic=_text(h.get(hdr.DLT_ORIGINAL_TOPIC)),
            original_partition=_int(h.get(hdr.DLT_ORIGINAL_PARTITION)),
            original_offset=_int(h.get(hdr.DLT_ORIGINAL_OFFSET)),
            original_timestamp=_int(h.get(hdr.DLT_ORIGINAL_TIMESTAMP)),
            original_consumer_group=_text(h.get(hdr.DLT_ORIGINAL_CONSUMER_GROUP)),
            exception_fqcn=_text(h.get(hdr.DLT_EXCEPTION_FQCN)),
            exception_message=_text(h.get(hdr.DLT_EXCEPTION_MESSAGE)),
            exception_stacktrace=_text(h.get(hdr.DLT_EXCEPTION_STACKTRACE)),
            failure_class=_text(h.get(hdr.DLT_FAILURE_CLASS)),
            service=_text(h.get(hdr.DLT_SERVICE)),
            attempt=_int(h.get(hdr.ATTEMPT)),
        )


def original_headers(headers: Iterable[Header]) -> list[Header]:
    """The headers minus every ``strata-dlt-*`` one and ``strata-attempt``, order kept."""
    return [(k, v) for k, v in headers if not k.startswith(hdr.DLT_PREFIX) and k != hdr.ATTEMPT]


@dataclass(frozen=True, slots=True)
class DlqRecord:
    topic: str
    partition: int
    offset: int
    timestamp: int
    key: bytes | None
    value: bytes | None
    headers: tuple[Header, ...]
    dlt: DltHeaders

    @property
    def original_headers(self) -> list[Header]:
        """What :func:`redrive` publishes as headers."""
        return original_headers(self.headers)

    @classmethod
    def from_record(cls, record: Any) -> DlqRecord:
        headers = tuple((str(k), bytes(v)) for k, v in (record.headers or ()))
        return cls(
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            timestamp=record.timestamp,
            key=record.key,
            value=record.value,
            headers=headers,
            dlt=DltHeaders.from_headers(headers),
        )


@dataclass(frozen=True, slots=True)
class DlqSummary:
    """One DLQ topic.  ``records`` = true end minus beginning over all partitions; ``pending``
    = records not redriven yet by the redrive group; the counters describe the ``scanned``
    most recent records (``complete`` when that is all of them)."""

    topic: str
    partitions: int
    records: int
    pending: int
    failure_classes: dict[str, int]
    services: dict[str, int]
    original_topics: dict[str, int]
    scanned: int
    newest_timestamp: int | None

    @property
    def complete(self) -> bool:
        return self.scanned >= self.records


def _parse_ledger(metadata: str) -> set[int]:
    if not metadata.startswith(_LEDGER_PREFIX):
        return set()
    done: set[int] = set()
    for part in metadata[len(_LEDGER_PREFIX) :].split(","):
        with contextlib.suppress(ValueError):
            lo, _, hi = part.partition("-")
            done.update(range(int(lo), int(hi or lo) + 1))
    return done


def _format_ledger(done: Iterable[int]) -> str:
    offsets = sorted(set(done))
    if not offsets:
        return ""
    runs: list[str] = []
    start = prev = offsets[0]
    for o in [*offsets[1:], None]:
        if o is not None and o == prev + 1:
            prev = o
            continue
        runs.append(str(start) if start == prev else f"{start}-{prev}")
        if o is not None:
            start = prev = o
    return _LEDGER_PREFIX + ",".join(runs)


async def _dlq_partitions(
    settings: Settings, name: str
) -> tuple[list[TopicPartition], dict[str, int]]:
    counts = await list_topics(settings, include_internal=True)
    if name not in counts:
        raise TopicNotFoundError(
            f"dead-letter topic {name!r} does not exist (nothing failed "
            "there yet, or the topics were not created)"
        )
    return [TopicPartition(name, p) for p in range(counts[name])], counts


async def list_dlq(
    settings: Settings,
    topic_name: str | None = None,
    *,
    scan_limit: int = 1_000,
    redrive_group: str = DEFAULT_REDRIVE_GROUP,
) -> list[DlqSummary]:
    """Every DLQ topic (or the one of ``topic_name``) with counts and a failure summary.

    The summary reads the headers of at most ``scan_limit`` of the newest records per topic.
    """
    counts = await list_topics(settings, include_internal=True)
    if topic_name is not None:
        names = [dlq_topic_name(topic_name)]
        if names[0] not in counts:
            raise TopicNotFoundError(f"dead-letter topic {names[0]!r} does not exist")
    else:
        names = [n for n in counts if n.endswith(DLQ_SUFFIX)]
    out: list[DlqSummary] = []
    if not names:
        return out
    all_tps = [TopicPartition(n, p) for n in names for p in range(counts[n])]
    committed = await committed_offsets(settings, redrive_group, all_tps)
    async with open_consumer(settings) as consumer:
        bounds = await offset_bounds(consumer, all_tps)
        for name in names:
            tps = [tp for tp in all_tps if tp.topic == name]
            per_partition = math.ceil(scan_limit / len(tps)) if scan_limit > 0 else 0
            ranges = {
                tp: (max(bounds[tp].begin, bounds[tp].end - per_partition), bounds[tp].end)
                for tp in tps
            }
            classes: Counter[str] = Counter()
            services: Counter[str] = Counter()
            originals: Counter[str] = Counter()
            scanned, newest = 0, None
            async for _, records in iter_records(consumer, ranges):
                for r in records:
                    dlt = DltHeaders.from_headers(r.headers or ())
                    classes[dlt.failure_class or "?"] += 1
                    services[dlt.service or "?"] += 1
                    originals[dlt.original_topic or "?"] += 1
                    scanned += 1
                    newest = r.timestamp if newest is None else max(newest, r.timestamp)
            pending = 0
            for tp in tps:
                offset, metadata = committed[tp]
                b = bounds[tp]
                start = b.begin if offset is None else min(max(offset, b.begin), b.end)
                pending += (
                    b.end - start - len({o for o in _parse_ledger(metadata) if start <= o < b.end})
                )
            out.append(
                DlqSummary(
                    topic=name,
                    partitions=len(tps),
                    records=sum(bounds[tp].count for tp in tps),
                    pending=pending,
                    failure_classes=dict(classes.most_common()),
                    services=dict(services.most_common()),
                    original_topics=dict(originals.most_common()),
                    scanned=scanned,
                    newest_timestamp=newest,
                )
            )
    return out


async def read_dlq(
    settings: Settings,
    topic_name: str,
    offset: int | None = None,
    *,
    limit: int = 100,
    partition: int | None = None,
) -> list[DlqRecord]:
    """Up to ``limit`` records of a DLQ (``topic_name`` may be the DLQ or its source topic).

    Reads ``partition`` (default: every partition, in partition order) from ``offset``
    (default: the beginning; clamped into the partition's range).
    """
    name = dlq_topic_name(topic_name)
    tps, _ = await _dlq_partitions(settings, name)
    if partition is not None:
        if not 0 <= partition < len(tps):
            raise ConfigError(f"{name!r} has partitions 0..{len(tps) - 1}, not {partition}")
        tps = [TopicPartition(name, partition)]
    out: list[DlqRecord] = []
    async with open_consumer(settings) as consumer:
        bounds = await offset_bounds(consumer, tps)
        for tp in tps:
            if len(out) >= limit:
                break
            b = bounds[tp]
            start = b.begin if offset is None else min(max(offset, b.begin), b.end)
            stop = min(b.end, start + (limit - len(out)))
            async for _, records in iter_records(consumer, {tp: (start, stop)}):
                out.extend(DlqRecord.from_record(r) for r in records)
    return out[:limit]


@dataclass(frozen=True, slots=True)
class SkippedRecord:
    partition: int
    offset: int
    reason: str


@dataclass(slots=True)
class RedriveResult:
    """What a redrive did.  ``redriven`` counts records per target topic; ``records`` lists
    the (partition, offset) of every DLQ record re-published (or that would be, dry run)."""

    dlq_topic: str
    group: str
    dry_run: bool
    redriven: dict[str, int] = field(default_factory=dict)
    records: list[tuple[int, int]] = field(default_factory=list)
    already_redriven: int = 0
    skipped: list[SkippedRecord] = field(default_factory=list)
    committed: dict[int, int] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.redriven.values())


def _selection(
    offsets: Sequence[int | tuple[int, int]], tps: list[TopicPartition], name: str
) -> dict[TopicPartition, set[int]]:
    chosen: dict[TopicPartition, set[int]] = {}
    for ref in offsets:
        if isinstance(ref, tuple):
            part, off = ref
        elif len(tps) == 1:
            part, off = 0, ref
        else:
            raise ConfigError(
                f"{name!r} has {len(tps)} partitions: give offsets as (partition, offset)"
            )
        if not 0 <= part < len(tps):
            raise ConfigError(f"{name!r} has partitions 0..{len(tps) - 1}, not {part}")
        chosen.setdefault(tps[part], set()).add(int(off))
    return chosen


def _runs(offsets: Iterable[int]) -> list[tuple[int, int]]:
    """Sorted offsets as half-open contiguous ranges."""
    out: list[tuple[int, int]] = []
    for o in sorted(offsets):
        if out and out[-1][1] == o:
            out[-1] = (out[-1][0], o + 1)
        else:
            out.append((o, o + 1))
    return out


async def redrive(
    settings: Settings,
    dlq_topic: str,
    offsets: Sequence[int | tuple[int, int]] | None = None,
    *,
    all: bool = True,  # the CLI's word; shadows the builtin here only
    group: str = DEFAULT_REDRIVE_GROUP,
    dry_run: bool = False,
) -> RedriveResult:
    """Re-publish dead-lettered records to their original topic, byte-identical.

    ``offsets``: the DLQ records to redrive, as ``(partition, offset)`` (a bare offset is
    accepted for a single-partition DLQ); they take precedence over ``all``.  Without
    ``offsets`` and with ``all`` every record not redriven yet (per ``group``) up to the end
    the DLQ had when the call started is redriven.  Records already redriven are counted in
    ``already_redriven`` and not published again.

    Each record goes to ``strata-dlt-original-topic`` with the same key and value bytes and
    its original headers (see the module doc), to ``strata-dlt-original-partition`` when that
    partition exists (else the key decides).  Records without a usable original topic are
    reported in ``skipped``; a full redrive commits past them (they stay readable in the DLQ
    and can be redriven by offset later).  Progress is committed after every acknowledged
    chunk, so an interrupted redrive resumes where it stopped (at-least-once).
    """
    name = dlq_topic_name(dlq_topic)
    if offsets is None and not all:
        raise ConfigError("nothing to redrive: give offsets, or all=True")
    tps, counts = await _dlq_partitions(settings, name)
    ledgers = await committed_offsets(settings, group, tps)
    result = RedriveResult(dlq_topic=name, group=group, dry_run=dry_run)

    async with contextlib.AsyncExitStack() as stack:
        consumer = await stack.enter_async_context(open_consumer(settings))
        bounds = await offset_bounds(consumer, tps)
        start: dict[TopicPartition, int] = {}
        done: dict[TopicPartition, set[int]] = {}
        for tp in tps:
            offset, metadata = ledgers[tp]
            b = bounds[tp]
            start[tp] = b.begin if offset is None else min(max(offset, b.begin), b.end)
            done[tp] = {o for o in _parse_ledger(metadata) if start[tp] <= o < b.end}

        # What to read per partition (contiguous runs) and which offsets in them to leave.
        runs: dict[TopicPartition, list[tuple[int, int]]] = {}
        leave: dict[TopicPartition, set[int]] = {}
        if offsets is not None:
            for tp, chosen in _selection(offsets, tps, name).items():
                b = bounds[tp]
                outside = sorted(o for o in chosen if not b.begin <= o < b.end)
                if outside:
                    raise ConfigError(
                        f"no record at offset(s) {outside[:5]} of {name}[{tp.partition}]: "
                        f"it holds offsets {b.begin}..{b.end - 1}"
                    )
                old = {o for o in chosen if o < start[tp] or o in done[tp]}
                result.already_redriven += len(old)
                if chosen - old:
                    runs[tp] = _runs(chosen - old)
                    leave[tp] = set()
        else:
            for tp in tps:
                result.already_redriven += len(done[tp])
                if start[tp] < bounds[tp].end:
                    runs[tp] = [(start[tp], bounds[tp].end)]
                    leave[tp] = done[tp]

        producer = None
        committer = None
        if not dry_run and runs:
            producer = await stack.enter_async_context(open_producer(settings))
            committer = await stack.enter_async_context(open_consumer(settings, group_id=group))
            committer.assign(tps)

        for tp, tp_runs in runs.items():
            redriven_here: set[int] = set()
            for lo, hi in tp_runs:
                async for _, records in iter_records(consumer, {tp: (lo, hi)}):
                    futures = []
                    for r in records:
                        if r.offset in leave[tp]:
                            continue
                        target = _route(r, counts)
                        if isinstance(target, SkippedRecord):
                            result.skipped.append(target)
                            continue
                        topic_name, part = target
                        result.records.append((tp.partition, r.offset))
                        result.redriven[topic_name] = result.redriven.get(topic_name, 0) + 1
                        redriven_here.add(r.offset)
                        if producer is not None:
                            futures.append(
                                await producer.send(
                                    topic_name,
                                    value=r.value,
                                    key=r.key,
                                    partition=part,
                                    headers=original_headers(r.headers or ()),
                                )
                            )
                    if futures:
                        async with broker_errors(settings, "redriving"):
                            await asyncio.gather(*futures)
                    if committer is not None and offsets is None:
                        # Full redrive: everything up to this chunk is handled.
                        next_start = records[-1].offset + 1
                        left = {o for o in done[tp] if o >= next_start}
                        await _commit(settings, committer, tp, next_start, left, result=result)
            if committer is None:
                continue
            if offsets is None:
                await _commit(settings, committer, tp, bounds[tp].end, set(), result=result)
            else:
                ledger = done[tp] | redriven_here
                next_start = start[tp]
                while next_start in ledger:
                    next_start += 1
                await _commit(
                    settings,
                    committer,
                    tp,
                    next_start,
                    {o for o in ledger if o > next_start},
                    result=result,
                )

    if not dry_run and offsets is not None:
        await _check_ledger(settings, group, tps, result)
    return result


def _route(record: Any, counts: dict[str, int]) -> tuple[str, int | None] | SkippedRecord:
    dlt = DltHeaders.from_headers(record.headers or ())
    target = dlt.original_topic
    if not target:
        return SkippedRecord(record.partition, record.offset, f"no {hdr.DLT_ORIGINAL_TOPIC} header")
    if target not in counts:
        return SkippedRecord(
            record.partition, record.offset, f"original topic {target!r} does not exist"
        )
    part = dlt.original_partition
    if part is None or not 0 <= part < counts[target]:
        part = None
    return target, part


async def _commit(
    settings: Settings,
    committer: Any,
    tp: TopicPartition,
    offset: int,
    ledger: set[int],
    *,
    result: RedriveResult,
) -> None:
    from aiokafka.structs import OffsetAndMetadata

    metadata = _format_ledger(ledger)
    if len(metadata) > _LEDGER_MAX_CHARS:
        metadata = ""
        result.warnings.append(
            f"too many records redriven one by one on partition {tp.partition} to remember "
            "them all: a later full redrive will publish some of them again"
        )
    async with broker_errors(settings, "committing redrive progress"):
        await committer.commit({tp: OffsetAndMetadata(offset, metadata)})
    result.committed[tp.partition] = offset


async def _check_ledger(
    settings: Settings, group: str, tps: list[TopicPartition], result: RedriveResult
) -> None:
    """Warn when the broker dropped the commit metadata that lists records redriven by offset."""
    back = await committed_offsets(settings, group, tps)
    for tp in tps:
        if tp.partition not in result.committed:
            continue
        _, metadata = back[tp]
        if not metadata.startswith(_LEDGER_PREFIX) and any(
            o > result.committed[tp.partition] for p, o in result.records if p == tp.partition
        ):
            result.warnings.append(
                "the broker does not keep offset-commit metadata (Tansu): records redriven "
                "by offset ahead of the committed position may be published again by a full "
                "redrive (harmless: handlers are idempotent by event id)"
            )
            return


# -- depth, for alerting -----------------------------------------------------------------

DLQ_DEPTH_INTERVAL_S = 30.0


async def sample_dlq_depth(
    settings: Settings, *, redrive_group: str = DEFAULT_REDRIVE_GROUP
) -> dict[str, int]:
    """Set ``strata_dlq_depth{topic}`` to every DLQ's records not redriven yet; returns them.

    Depth, not inflow: ``strata_dlq_messages_total`` counts what one process dead-lettered
    since it started, whereas an operator's question is how much waits in the topic (the
    alert "DLQ depth > 10"), whoever put it there and whatever was redriven since.
    """
    depths = {s.topic: s.pending for s in await list_dlq(settings, scan_limit=0)}
    gauge = bus_metrics().dlq_depth
    for key in list(gauge.values):
        if key[0] not in depths:
            gauge.remove(*key)
    for name, pending in depths.items():
        gauge.labels(name).set(pending)
    return depths


async def watch_dlq_depth(settings: Settings, interval_s: float = DLQ_DEPTH_INTERVAL_S) -> None:
    """Sample the DLQ depths every ``interval_s`` until cancelled (a broker hiccup is logged
    and retried at the next interval, never raised)."""
    while True:
        try:
            await sample_dlq_depth(settings)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("dlq depth not sampled", error=type(exc).__name__)
        await asyncio.sleep(interval_s)
