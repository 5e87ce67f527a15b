"""Consumer-group resets and shadow copies against the real embedded broker."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from stratamesh.bus import headers as hdr
from stratamesh.bus.admin import create_topic, group_is_active, group_offsets, list_topics
from stratamesh.bus.offsets import commit_offsets
from stratamesh.bus.replay import (
    GroupActiveError,
    copy_range,
    execute_plan,
    execute_reset,
    plan_reset,
)
from stratamesh.config import Settings
from stratamesh.errors import BrokerError, ConfigError
from tests.integration.records import produce_batch, read_topic


async def test_reset_to_offset_dry_run_then_execute(
    settings: Settings, unique: str, producer: AIOKafkaProducer
) -> None:
    topic, group = f"reset-off-{unique}", f"svc-{unique}"
    await create_topic(settings, topic, 3)
    now = int(time.time() * 1000)
    await produce_batch(producer, topic, 0, [now] * 6)
    await produce_batch(producer, topic, 0, [now] * 4)
    await produce_batch(producer, topic, 1, [now] * 3)
    await commit_offsets(
        settings, group, {TopicPartition(topic, 0): 10, TopicPartition(topic, 1): 3}
    )

    plan = await plan_reset(settings, group, topic, to_offset=5)
    assert [(r.partition, r.current, r.target, r.end) for r in plan.rows] == [
        (0, 10, 5, 10),
        (1, 3, 3, 3),
        (2, None, 0, 0),
    ]  # clamped into [begin, true end]
    assert plan.rows[0].lag_before == 0 and plan.rows[0].lag_after == 5
    assert not plan.executed
    assert await group_offsets(settings, group, topic) == {0: 10, 1: 3, 2: None}  # dry run

    done = await execute_reset(settings, group, topic, to_offset=5)
    assert done.executed and done.targets == {0: 5, 1: 3, 2: 0}
    assert await group_offsets(settings, group, topic) == {0: 5, 1: 3, 2: 0}

    # A consumer of the group now starts where the reset put it.
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.bootstrap_servers,
        group_id=group,
        enable_auto_commit=False,
        fetch_max_wait_ms=50,
    )
    await consumer.start()
    try:
        tp0 = TopicPartition(topic, 0)
        consumer.assign([tp0])
        assert await consumer.position(tp0) == 5
    finally:
        await consumer.stop()

    latest = await execute_reset(settings, group, topic, to_latest=True, partitions=[0])
    assert latest.targets == {0: 10}
    shifted = await plan_reset(settings, group, topic, shift_by=-4)
    assert shifted.targets == {0: 6, 1: 0, 2: 0}
    earliest = await execute_plan(
        settings, await plan_reset(settings, group, topic, to_offset={1: 1})
    )
    assert earliest.targets == {1: 1}
    assert await group_offsets(settings, group, topic) == {0: 10, 1: 1, 2: 0}

    with pytest.raises(ConfigError, match="exactly one"):
        await plan_reset(settings, group, topic, to_offset=1, to_earliest=True)
    with pytest.raises(ConfigError, match="exactly one"):
        await plan_reset(settings, group, topic)
    with pytest.raises(ConfigError, match="partitions"):
        await plan_reset(settings, group, topic, to_earliest=True, partitions=[7])


async def test_reset_by_datetime_and_duration(
    settings: Settings, unique: str, producer: AIOKafkaProducer
) -> None:
    topic, group = f"reset-time-{unique}", f"svc-{unique}"
    await create_topic(settings, topic, 2)
    now = int(time.time() * 1000)
    # Partition 0: one record every 10 s over the last 200 s, in batches of 5.
    ts0 = [now - 200_000 + 10_000 * i for i in range(20)]
    for i in range(0, 20, 5):
        await produce_batch(producer, topic, 0, ts0[i : i + 5])
    # Partition 1: everything is older than the targets.
    await produce_batch(producer, topic, 1, [now - 300_000] * 4)

    when = datetime.fromtimestamp((now - 95_000) / 1000, tz=UTC)  # between records 10 and 11
    plan = await plan_reset(settings, group, topic, to_datetime=when)
    assert plan.targets == {0: 11, 1: 4}
    naive_local = when.astimezone().replace(tzinfo=None)  # naive = local time
    assert (await plan_reset(settings, group, topic, to_datetime=naive_local)).targets == {
        0: 11,
        1: 4,
    }

    # now - 55 s lies between records 14 (now - 60 s) and 15 (now - 50 s): 5 s margin each way.
    by = await execute_reset(settings, group, topic, by_duration=timedelta(seconds=55))
    assert by.targets == {0: 15, 1: 4}
    assert await group_offsets(settings, group, topic) == {0: 15, 1: 4}
    far = await plan_reset(settings, group, topic, by_duration=timedelta(days=1))
    assert far.targets == {0: 0, 1: 0}


async def test_reset_refused_while_the_group_is_running(
    settings: Settings, unique: str, producer: AIOKafkaProducer
) -> None:
    topic, group = f"reset-live-{unique}", f"svc-{unique}"
    await create_topic(settings, topic, 2)
    await produce_batch(producer, topic, 0, [int(time.time() * 1000)] * 5)
    await commit_offsets(settings, group, {TopicPartition(topic, 0): 5})

    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=settings.bootstrap_servers,
        group_id=group,
        enable_auto_commit=False,
        session_timeout_ms=3000,
        heartbeat_interval_ms=500,
        fetch_max_wait_ms=50,
    )
    await consumer.start()
    try:
        deadline = time.monotonic() + 15
        while not consumer.assignment():
            assert time.monotonic() < deadline
            await consumer.getmany(timeout_ms=100)
        plan = await plan_reset(settings, group, topic, to_earliest=True)  # planning is fine
        assert plan.targets == {0: 0, 1: 0}
        with pytest.raises(GroupActiveError, match="active member") as info:
            await execute_reset(settings, group, topic, to_earliest=True)
        assert isinstance(info.value, BrokerError)
        with pytest.raises(GroupActiveError):
            await execute_plan(settings, plan)
        assert await group_offsets(settings, group, topic) == {0: 5, 1: None}
    finally:
        await consumer.stop()

    start = time.monotonic()
    while await group_is_active(settings, group):
        assert time.monotonic() - start < 12, "the stopped consumer never left the group"
        await asyncio.sleep(0.25)
    done = await execute_reset(settings, group, topic, to_earliest=True)
    assert done.executed and await group_offsets(settings, group, topic) == {0: 0, 1: 0}


async def test_copy_range_into_shadow_is_byte_identical(
    settings: Settings, unique: str, producer: AIOKafkaProducer
) -> None:
    topic = f"requests-{unique}"
    await create_topic(settings, topic, 3)
    now = int(time.time() * 1000)
    signed = [
        ("strata-event-id", b"e1"),
        ("strata-signature", bytes(range(64))),
        ("dup", b"a"),
        ("dup", b"b"),
        (hdr.REPLAY, b"older-replay"),
    ]
    await produce_batch(
        producer, topic, 0, [now - 10_000 + i * 1000 for i in range(6)], headers=signed
    )
    await produce_batch(producer, topic, 0, [now - 4_000 + i * 1000 for i in range(3)])
    await produce_batch(producer, topic, 2, [now - 10_000 + i * 1000 for i in range(4)])

    result = await copy_range(settings, topic, from_=2, to=7, replay_id="replay-1")
    assert result.target == f"shadow.{topic}" and result.replay_id == "replay-1"
    assert result.ranges == {0: (2, 7), 1: (0, 0), 2: (2, 4)}
    assert result.copied == {0: 5, 1: 0, 2: 2} and result.total == 7
    assert (await list_topics(settings))[result.target] == 3

    source = {(r.partition, r.offset): r for r in await read_topic(settings, topic, 3)}
    copies = await read_topic(settings, result.target, 3)
    assert len(copies) == 7
    expected = [(0, o) for o in range(2, 7)] + [(2, 2), (2, 3)]
    by_partition: dict[int, list[Any]] = {}
    for c in copies:
        by_partition.setdefault(c.partition, []).append(c)
    pairs = [(p, o) for p, o in expected]
    for (p, o), copy in zip(pairs, [*by_partition[0], *by_partition[2]], strict=True):
        original = source[(p, o)]
        assert copy.partition == original.partition == p
        assert copy.key == original.key and copy.value == original.value
        want = [h for h in original.headers if h[0] != hdr.REPLAY] + [(hdr.REPLAY, b"replay-1")]
        assert list(copy.headers) == want

    # By time: [now - 7.5 s, now - 2.5 s) on the source clock.
    frm = datetime.fromtimestamp((now - 7_500) / 1000, tz=UTC)
    to = datetime.fromtimestamp((now - 2_500) / 1000, tz=UTC)
    by_time = await copy_range(settings, topic, from_=frm, to=to, into=f"audit-{unique}")
    assert by_time.target == f"audit-{unique}"
    # p0: records at -10..-5 s (offsets 0-5) then -4..-2 s (6-8): [-7.5 s, -2.5 s) = 3..7
    assert by_time.ranges == {0: (3, 8), 1: (0, 0), 2: (3, 4)}
    assert by_time.total == 6
    ids = {
        h
        for r in await read_topic(settings, f"audit-{unique}", 3)
        for k, h in r.headers
        if k == hdr.REPLAY
    }
    assert ids == {by_time.replay_id.encode()}

    with pytest.raises(ConfigError, match="already a shadow"):
        await copy_range(settings, result.target)
    with pytest.raises(ConfigError, match="into itself"):
        await copy_range(settings, topic, into=topic)
