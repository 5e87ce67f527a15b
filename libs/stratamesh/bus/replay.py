"""Replay (DESIGN.md §2, `strata replay`).

(a) **Reset** a stopped service's consumer group to an offset, a point in time or a duration
    ago, like ``kafka-consumer-groups --reset-offsets``: :func:`plan_reset` is the dry run
    (current and target offset per partition, nothing changed), :func:`execute_reset` /
    :func:`execute_plan` commit the targets and refuse while the group has active members.
    Targets are clamped into ``[beginning, true end]``; times resolve through
    :func:`~stratamesh.bus.offsets.offsets_for_timestamp` (verified, right on Tansu too).
(b) **Copy** a range of a topic into the shadow namespace (``shadow.<topic>``, created with
    the source's partition count): every record keeps its partition number and its key,
    value and header bytes, plus a ``strata-replay: <replay id>`` header.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta

from aiokafka import TopicPartition

from stratamesh.bus import headers as hdr
from stratamesh.bus.admin import (
    GroupActiveError,
    committed_offsets,
    create_shadow_topic,
    open_producer,
    require_inactive,
)
from stratamesh.bus.clients import broker_errors
from stratamesh.bus.offsets import (
    DEFAULT_SKEW_MS,
    OffsetBounds,
    commit_offsets,
    iter_records,
    offset_bounds,
    offsets_for_timestamp,
    open_consumer,
    topic_partitions,
)
from stratamesh.bus.topics import SHADOW_PREFIX, shadow_of
from stratamesh.config import Settings
from stratamesh.errors import BrokerError, ConfigError

__all__ = [
    "CopyResult",
    "GroupActiveError",
    "ResetPlan",
    "ResetRow",
    "copy_range",
    "execute_plan",
    "execute_reset",
    "plan_reset",
    "to_epoch_ms",
]


def to_epoch_ms(when: datetime) -> int:
    """Epoch milliseconds of ``when`` (a naive datetime is local time, like Python's)."""
    return int(when.timestamp() * 1000)


@dataclass(frozen=True, slots=True)
class ResetRow:
    partition: int
    current: int | None  # committed offset, None when the group never committed here
    target: int
    begin: int
    end: int

    @property
    def lag_before(self) -> int:
        start = self.begin if self.current is None else max(self.current, self.begin)
        return max(0, self.end - start)

    @property
    def lag_after(self) -> int:
        return max(0, self.end - self.target)

    @property
    def changed(self) -> bool:
        return self.current != self.target


@dataclass(frozen=True, slots=True)
class ResetPlan:
    group: str
    topic: str
    strategy: str
    rows: tuple[ResetRow, ...]
    executed: bool = False

    @property
    def targets(self) -> dict[int, int]:
        return {r.partition: r.target for r in self.rows}


async def plan_reset(
    settings: Settings,
    group: str,
    topic_name: str,
    *,
    to_offset: int | Mapping[int, int] | None = None,
    to_datetime: datetime | None = None,
    by_duration: timedelta | None = None,
    to_earliest: bool = False,
    to_latest: bool = False,
    shift_by: int | None = None,
    partitions: Sequence[int] | None = None,
    skew_ms: int = DEFAULT_SKEW_MS,
) -> ResetPlan:
    """The dry run of a reset: per partition the committed offset and the target.

    Give exactly one strategy: ``to_offset`` (one offset for every partition, or
    partition → offset for those partitions only), ``to_datetime`` (first record at or after
    it), ``by_duration`` (``to_datetime`` = now minus the duration), ``to_earliest``,
    ``to_latest``, or ``shift_by`` (committed offset plus n; the beginning when nothing is
    committed).  ``partitions`` limits the plan.  Changes nothing.
    """
    chosen = [
        name
        for name, v in (
            ("to_offset", to_offset),
            ("to_datetime", to_datetime),
            ("by_duration", by_duration),
            ("to_earliest", to_earliest or None),
            ("to_latest", to_latest or None),
            ("shift_by", shift_by),
        )
        if v is not None
    ]
    if len(chosen) != 1:
        raise ConfigError(
            "give exactly one reset strategy (to_offset, to_datetime, by_duration, "
            f"to_earliest, to_latest, shift_by); got {chosen or 'none'}"
        )
    async with open_consumer(settings) as consumer:
        existing = await topic_partitions(consumer, topic_name)
        selected = list(existing if partitions is None else partitions)
        if isinstance(to_offset, Mapping):
            selected = [p for p in selected if p in to_offset]
            unknown = sorted(set(to_offset) - set(existing))
            if unknown:
                raise ConfigError(f"{topic_name!r} has no partition {unknown}")
        bad = sorted(set(selected) - set(existing))
        if bad:
            raise ConfigError(f"{topic_name!r} has partitions {existing}, not {bad}")
        tps = [TopicPartition(topic_name, p) for p in selected]
        bounds = await offset_bounds(consumer, tps)
        by_time: dict[TopicPartition, int] = {}
        strategy = chosen[0]
        if to_datetime is not None or by_duration is not None:
            if by_duration is not None:
                ts_ms = int(time.time() * 1000) - int(by_duration.total_seconds() * 1000)
                strategy = f"by_duration {by_duration} (from {ts_ms} ms)"
            else:
                assert to_datetime is not None
                ts_ms = to_epoch_ms(to_datetime)
                strategy = f"to_datetime {to_datetime.isoformat()} ({ts_ms} ms)"
            by_time = await offsets_for_timestamp(consumer, tps, ts_ms, skew_ms=skew_ms)
    committed = await committed_offsets(settings, group, tps)

    rows: list[ResetRow] = []
    for tp in tps:
        b: OffsetBounds = bounds[tp]
        current = committed[tp][0]
        if isinstance(to_offset, Mapping):
            target = to_offset[tp.partition]
        elif isinstance(to_offset, int):
            target = to_offset
            strategy = f"to_offset {to_offset}"
        elif tp in by_time:
            target = by_time[tp]
        elif to_earliest:
            target = b.begin
        elif to_latest:
            target = b.end
        else:
            assert shift_by is not None
            target = (b.begin if current is None else current) + shift_by
            strategy = f"shift_by {shift_by}"
        rows.append(
            ResetRow(tp.partition, current, min(max(target, b.begin), b.end), b.begin, b.end)
        )
    return ResetPlan(group=group, topic=topic_name, strategy=strategy, rows=tuple(rows))


async def execute_plan(settings: Settings, plan: ResetPlan) -> ResetPlan:
    """Commit the targets of ``plan`` for its group.

    Raises :class:`GroupActiveError` while the group has active members (stop the service
    first; a stopped consumer is gone once its session timeout has passed).  The commit is
    read back and checked.
    """
    what = f"reset the offsets of group {plan.group!r} on {plan.topic!r}"
    await require_inactive(settings, plan.group, what)
    tps = {TopicPartition(plan.topic, r.partition): r.target for r in plan.rows}
    await commit_offsets(settings, plan.group, tps)
    back = await committed_offsets(settings, plan.group, list(tps))
    wrong = {tp.partition: (want, back[tp][0]) for tp, want in tps.items() if back[tp][0] != want}
    if wrong:
        raise BrokerError(
            f"the broker did not keep the reset of {plan.group!r}: "
            f"partition → (wanted, committed) {wrong}"
        )
    return replace(plan, executed=True)


async def execute_reset(
    settings: Settings,
    group: str,
    topic_name: str,
    *,
    to_offset: int | Mapping[int, int] | None = None,
    to_datetime: datetime | None = None,
    by_duration: timedelta | None = None,
    to_earliest: bool = False,
    to_latest: bool = False,
    shift_by: int | None = None,
    partitions: Sequence[int] | None = None,
    skew_ms: int = DEFAULT_SKEW_MS,
) -> ResetPlan:
    """:func:`plan_reset` then :func:`execute_plan`; refuses before planning if the group is
    active.  Returns the executed plan (``current`` = the offsets before the reset)."""
    await require_inactive(
        settings, group, f"reset the offsets of group {group!r} on {topic_name!r}"
    )
    plan = await plan_reset(
        settings,
        group,
        topic_name,
        to_offset=to_offset,
        to_datetime=to_datetime,
        by_duration=by_duration,
        to_earliest=to_earliest,
        to_latest=to_latest,
        shift_by=shift_by,
        partitions=partitions,
        skew_ms=skew_ms,
    )
    return await execute_plan(settings, plan)


@dataclass(frozen=True, slots=True)
class CopyResult:
    source: str
    target: str
    replay_id: str
    ranges: dict[int, tuple[int, int]] = field(default_factory=dict)  # [start, stop) per part.
    copied: dict[int, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.copied.values())


def _resolve(
    spec: int | datetime | None,
    tp: TopicPartition,
    b: OffsetBounds,
    by_time: Mapping[tuple[TopicPartition, int], int],
    default: int,
) -> int:
    if spec is None:
        return default
    if isinstance(spec, datetime):
        return by_time[(tp, to_epoch_ms(spec))]
    return min(max(int(spec), b.begin), b.end)


async def copy_range(
    settings: Settings,
    topic_name: str,
    *,
    from_: int | datetime | None = None,
    to: int | datetime | None = None,
    into: str = "shadow",
    replay_id: str | None = None,
    partitions: Sequence[int] | None = None,
    replication_factor: int = 1,
    skew_ms: int = DEFAULT_SKEW_MS,
) -> CopyResult:
    """Re-publish the records of ``topic_name`` in ``[from_, to)`` into the shadow topic.

    ``from_`` / ``to``: an offset (the same for every partition, clamped) or a datetime (the
    first record at or after it); defaults are the beginning and the end the topic had when
    the call started.  ``into="shadow"`` targets ``shadow.<topic>``; any other value is the
    target topic's name.  The target is created with the source's partition count if
    missing.  Each copy goes to the same partition number with identical key, value and
    headers, except that any ``strata-replay`` header is replaced by
    ``strata-replay: <replay_id>`` (default: a new UUID), appended last.
    """
    target = shadow_of(topic_name) if into == "shadow" else into
    if topic_name.startswith(SHADOW_PREFIX) and into == "shadow":
        raise ConfigError(f"{topic_name!r} is already a shadow topic; name the target with into=")
    rid = replay_id or str(uuid.uuid4())
    marker = (hdr.REPLAY, rid.encode())
    async with open_consumer(settings) as consumer:
        existing = await topic_partitions(consumer, topic_name)
        selected = list(existing if partitions is None else partitions)
        bad = sorted(set(selected) - set(existing))
        if bad:
            raise ConfigError(f"{topic_name!r} has partitions {existing}, not {bad}")
        tps = [TopicPartition(topic_name, p) for p in selected]
        bounds = await offset_bounds(consumer, tps)
        by_time: dict[tuple[TopicPartition, int], int] = {}
        for spec in (from_, to):
            if isinstance(spec, datetime):
                ts_ms = to_epoch_ms(spec)
                found = await offsets_for_timestamp(consumer, tps, ts_ms, skew_ms=skew_ms)
                by_time.update({(tp, ts_ms): o for tp, o in found.items()})
        ranges: dict[TopicPartition, tuple[int, int]] = {}
        for tp in tps:
            b = bounds[tp]
            start = _resolve(from_, tp, b, by_time, b.begin)
            stop = _resolve(to, tp, b, by_time, b.end)
            ranges[tp] = (start, max(start, stop))
        await create_shadow_topic(
            settings, topic_name, name=target, replication_factor=replication_factor
        )
        copied = {tp.partition: 0 for tp in tps}
        if any(stop > start for start, stop in ranges.values()):
            async with open_producer(settings) as producer:
                async for tp, records in iter_records(consumer, ranges):
                    futures = []
                    for r in records:
                        headers = [(k, v) for k, v in (r.headers or ()) if k != hdr.REPLAY]
                        headers.append(marker)
                        futures.append(
                            await producer.send(
                                target,
                                value=r.value,
                                key=r.key,
                                partition=tp.partition,
                                headers=headers,
                            )
                        )
                    async with broker_errors(settings, f"copying into {target!r}"):
                        await asyncio.gather(*futures)
                    copied[tp.partition] += len(futures)
    return CopyResult(
        source=topic_name,
        target=target,
        replay_id=rid,
        ranges={tp.partition: r for tp, r in ranges.items()},
        copied=copied,
    )
