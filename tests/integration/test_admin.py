"""Topic and group administration against the real embedded broker."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from stratamesh.bus.admin import (
    committed_offsets,
    consumer_lag,
    create_shadow_topic,
    create_topic,
    describe_group,
    describe_topic,
    ensure_topics,
    group_is_active,
    group_members,
    group_offsets,
    list_groups,
    list_topics,
)
from stratamesh.bus.offsets import TopicNotFoundError, commit_offsets
from stratamesh.bus.topics import ALL_TOPICS, TOPICS, dlq_of, topic
from stratamesh.config import Settings
from stratamesh.embedded import free_port
from stratamesh.errors import BrokerError, ConfigError


async def produce(settings: Settings, topic_name: str, partition: int, n: int) -> None:
    """``n`` records in one batch."""
    p = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers, enable_idempotence=False)
    await p.start()
    try:
        batch = p.create_batch()
        for i in range(n):
            assert batch.append(key=b"k%d" % i, value=b"v", timestamp=None) is not None
        batch.close()
        await (await p.send_batch(batch, topic_name, partition=partition))
    finally:
        await p.stop()


async def test_ensure_topics_creates_registry_and_dlq_twins_idempotently(
    settings: Settings,
) -> None:
    created = await ensure_topics(settings, partitions=2)
    assert set(created) == set(ALL_TOPICS) and all(created.values())
    again = await ensure_topics(settings)
    assert set(again) == set(ALL_TOPICS) and not any(again.values())
    listed = await list_topics(settings)
    assert {name: listed[name] for name in ALL_TOPICS} == dict.fromkeys(ALL_TOPICS, 2)
    desc = await describe_topic(settings, TOPICS[0].name)
    assert desc.spec == TOPICS[0] and desc.dlq == dlq_of(TOPICS[0].name) and desc.dlq_exists
    assert [p.partition for p in desc.partitions] == [0, 1] and desc.records == 0


async def test_ensure_topics_partitions_from_settings_then_spec(
    settings: Settings, unique: str
) -> None:
    spec = TOPICS[1]
    overridden = settings.model_copy(update={"topic_partitions": 3})
    assert await ensure_topics(overridden, [spec.name]) == {spec.name: True}
    assert await ensure_topics(settings, [spec.dlq]) == {spec.dlq: True}
    listed = await list_topics(settings)
    assert listed[spec.name] == 3
    assert listed[spec.dlq] == topic(spec.dlq).partitions == spec.partitions
    with pytest.raises(ConfigError, match="partition count"):
        await ensure_topics(settings, [f"not-in-registry-{unique}"])
    assert await ensure_topics(settings, [f"adhoc-{unique}"], partitions=1) == {
        f"adhoc-{unique}": True
    }


async def test_create_topic_and_shadow_twin(settings: Settings, unique: str) -> None:
    src = f"orders-{unique}"
    assert await create_topic(settings, src, 5, retention_ms=60_000) is True
    assert await create_topic(settings, src, 5) is False
    assert await create_shadow_topic(settings, src) == (f"shadow.{src}", 5)
    assert await create_shadow_topic(settings, src) == (f"shadow.{src}", 5)  # idempotent
    small = f"small-{unique}"
    await create_topic(settings, small, 2)
    with pytest.raises(BrokerError, match="has 2 partitions"):
        await create_shadow_topic(settings, src, name=small)
    with pytest.raises(TopicNotFoundError):
        await create_shadow_topic(settings, f"nope-{unique}")
    listed = await list_topics(settings)
    assert listed[src] == 5 and listed[f"shadow.{src}"] == 5
    assert f"shadow.nope-{unique}" not in listed


async def test_describe_topic_true_ends_offsets_and_lag(settings: Settings, unique: str) -> None:
    name = f"lagging-{unique}"
    await create_topic(settings, name, 3)
    await produce(settings, name, 0, 8)
    await produce(settings, name, 0, 4)
    await produce(settings, name, 1, 6)
    group = f"svc-{unique}"
    await commit_offsets(settings, group, {TopicPartition(name, 0): 5, TopicPartition(name, 1): 6})

    assert await group_offsets(settings, group, name) == {0: 5, 1: 6, 2: None}
    lag = await consumer_lag(settings, group, name)
    assert {p: (v.committed, v.end, v.lag) for p, v in lag.items()} == {
        0: (5, 12, 7),
        1: (6, 6, 0),
        2: (None, 0, 0),
    }

    desc = await describe_topic(settings, name, groups=[group])
    assert [(p.partition, p.begin, p.end) for p in desc.partitions] == [
        (0, 0, 12),
        (1, 0, 6),
        (2, 0, 0),
    ]
    assert desc.records == 18 and desc.spec is None and not desc.dlq_exists
    assert [(r.partition, r.committed, r.lag) for r in desc.groups[group]] == [
        (0, 5, 7),
        (1, 6, 0),
        (2, None, 0),
    ]
    # Every group that committed on the topic, found without being named.
    other = f"other-{unique}"
    await commit_offsets(settings, other, {TopicPartition(name, 2): 0})
    assert other in await list_groups(settings)
    found = await describe_topic(settings, name, all_groups=True)
    assert {group, other} <= set(found.groups)
    committed = await committed_offsets(settings, other, [TopicPartition(name, 2)])
    assert committed[TopicPartition(name, 2)][0] == 0


async def test_describe_missing_topic_raises_and_does_not_create_it(
    settings: Settings, unique: str
) -> None:
    missing = f"ghost-{unique}"
    with pytest.raises(TopicNotFoundError, match="does not exist"):
        await describe_topic(settings, missing)
    with pytest.raises(TopicNotFoundError):
        await group_offsets(settings, "g", missing)
    assert missing not in await list_topics(settings)


@contextlib.asynccontextmanager
async def member(
    settings: Settings, topic_name: str, group: str
) -> AsyncIterator[AIOKafkaConsumer]:
    consumer = AIOKafkaConsumer(
        topic_name,
        bootstrap_servers=settings.bootstrap_servers,
        group_id=group,
        session_timeout_ms=3000,
        heartbeat_interval_ms=500,
        fetch_max_wait_ms=50,
        enable_auto_commit=False,
    )
    await consumer.start()
    try:
        deadline = time.monotonic() + 15
        while not consumer.assignment():
            assert time.monotonic() < deadline, "the consumer never got partitions"
            await consumer.getmany(timeout_ms=100)
        yield consumer
    finally:
        await consumer.stop()


async def wait_inactive(settings: Settings, group: str, timeout: float = 12.0) -> float:
    start = time.monotonic()
    while await group_is_active(settings, group):
        assert time.monotonic() - start < timeout, "the stopped member never expired"
        await asyncio.sleep(0.25)
    return time.monotonic() - start


async def test_group_members_and_activity(settings: Settings, unique: str) -> None:
    name, group = f"members-{unique}", f"grp-{unique}"
    await create_topic(settings, name, 2)
    assert not await group_is_active(settings, group)
    assert await group_members(settings, group) == []
    assert group not in await list_groups(settings)  # asking did not create it
    async with member(settings, name, group) as consumer:
        members = await group_members(settings, group)
        assert len(members) == 1 and members[0].member_id
        desc = await describe_group(settings, group)
        assert desc.active and desc.protocol_type == "consumer"
        # Asking (which expires silent members) must not disturb a live member.
        for _ in range(4):
            assert await group_is_active(settings, group)
            await consumer.getmany(timeout_ms=300)
        assert len(consumer.assignment()) == 2
    waited = await wait_inactive(settings, group)
    print(f"stopped member gone after {waited:.1f} s")


async def test_unreachable_broker_fails_fast_with_a_fix(tmp_path: object) -> None:
    closed = Settings(bootstrap_servers=f"127.0.0.1:{free_port()}")
    start = time.monotonic()
    with pytest.raises(BrokerError, match="STRATA_BOOTSTRAP_SERVERS") as info:
        await list_topics(closed)
    assert "is the broker running" in str(info.value)
    with pytest.raises(BrokerError, match="STRATA_BOOTSTRAP_SERVERS"):
        await group_offsets(closed, "g", "t")
    assert time.monotonic() - start < 5

    with pytest.raises(BrokerError, match="STRATA_BOOTSTRAP_SERVERS"):
        await list_topics(Settings(bootstrap_servers=None))


async def test_silent_broker_times_out_instead_of_hanging() -> None:
    writers: list[asyncio.StreamWriter] = []

    async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)  # accept, read, never reply
        with contextlib.suppress(Exception):
            await reader.read()

    server = await asyncio.start_server(never_answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        silent = Settings(bootstrap_servers=f"127.0.0.1:{port}")
        silent.producer.request_timeout_ms = 1000
        from stratamesh.bus.offsets import true_end_offsets

        for call in (list_topics(silent), true_end_offsets(silent, [TopicPartition("t", 0)])):
            start = time.monotonic()
            with pytest.raises(BrokerError, match="is the broker running"):
                await call
            assert time.monotonic() - start < 4
    finally:
        for w in writers:
            w.close()
        server.close()
        await server.wait_closed()
