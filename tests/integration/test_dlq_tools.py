"""DLQ list / read / redrive against the real embedded broker."""

from __future__ import annotations

import os
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer, TopicPartition

from stratamesh.bus import headers as hdr
from stratamesh.bus.admin import committed_offsets, create_topic
from stratamesh.bus.dlq import (
    DEFAULT_REDRIVE_GROUP,
    DltHeaders,
    list_dlq,
    read_dlq,
    redrive,
)
from stratamesh.bus.offsets import TopicNotFoundError, true_end_offsets
from stratamesh.config import Settings
from stratamesh.errors import ConfigError
from tests.integration.records import read_topic

Header = tuple[str, bytes]


def original(i: int) -> list[Header]:
    """Headers as a signed envelope has them (opaque bytes, a repeated name, an empty value)."""
    return [
        (hdr.EVENT_TYPE, b"InferenceRequested"),
        (hdr.EVENT_ID, b"0190-%04d" % i),
        (hdr.REQUEST_ID, b"req-%d" % i),
        (hdr.TENANT, b"acme"),
        (hdr.PRODUCER, b"client:web"),
        (hdr.SIGNATURE, os.urandom(64)),
        ("x-repeated", b"1"),
        ("x-repeated", b"2"),
        (hdr.TRACEPARENT, b""),
    ]


def dead_letter(
    orig: list[Header],
    *,
    topic: str | None,
    partition: bytes | None,
    failure: str = "poison",
    attempt: int = 1,
) -> list[Header]:
    """The middleware's layout, with one DLT header slipped into the middle for good measure."""
    dlt: list[Header] = []
    if topic is not None:
        dlt.append((hdr.DLT_ORIGINAL_TOPIC, topic.encode()))
    if partition is not None:
        dlt.append((hdr.DLT_ORIGINAL_PARTITION, partition))
    dlt += [
        (hdr.DLT_ORIGINAL_OFFSET, b"41"),
        (hdr.DLT_ORIGINAL_TIMESTAMP, b"1700000000000"),
        (hdr.DLT_ORIGINAL_CONSUMER_GROUP, b"guard"),
        (hdr.DLT_EXCEPTION_FQCN, b"stratamesh.errors.DecodeError"),
        (hdr.DLT_EXCEPTION_MESSAGE, "bad bytes \u2013 really".encode()),
        (hdr.DLT_EXCEPTION_STACKTRACE, b"Traceback ..."),
        (hdr.DLT_FAILURE_CLASS, failure.encode()),
        (hdr.DLT_SERVICE, b"guard"),
        (hdr.ATTEMPT, str(attempt).encode()),
    ]
    return [*orig[:3], (hdr.DLT_SERVICE, b"guard"), *orig[3:], *dlt]


@pytest.fixture
def producer_options() -> dict[str, Any]:
    """Linger, so that several sends to one DLQ partition share a multi-record batch."""
    return {"linger_ms": 20}


async def test_list_read_and_redrive_byte_identical_once(
    settings: Settings, unique: str, producer: AIOKafkaProducer
) -> None:
    src = f"requests-{unique}"
    dlq = f"{src}.dlq"
    await create_topic(settings, src, 3)
    await create_topic(settings, dlq, 3)
    sent: list[tuple[int, bytes | None, bytes, list[Header], list[Header]]] = []
    futures = []
    for i in range(7):
        orig = original(i)
        target_partition = [2, 1, 0][i % 3]
        encoded = (
            str(target_partition).encode() if i != 5 else target_partition.to_bytes(4, "big")
        )  # Spring Kafka's binary int is understood too
        key = None if i == 6 else b"req-%d" % i
        value = os.urandom(40) + b"\x00\xff"
        headers = dead_letter(
            orig,
            topic=src,
            partition=encoded,
            failure="exhausted" if i % 2 else "poison",
            attempt=1 + i % 3,
        )
        sent.append((target_partition, key, value, orig, headers))
        # Several records per DLQ partition, in multi-record batches (linger).
        futures.append(
            await producer.send(dlq, value=value, key=key, headers=headers, partition=i % 3)
        )
    # Unroutable: no original topic header.
    futures.append(
        await producer.send(
            dlq,
            value=b"lost",
            key=b"k",
            partition=0,
            headers=dead_letter(original(99), topic=None, partition=b"0"),
        )
    )
    for f in futures:
        await f

    [summary] = await list_dlq(settings, src)
    assert summary.topic == dlq and summary.partitions == 3
    assert summary.records == 8 and summary.pending == 8 and summary.complete
    assert summary.failure_classes == {"poison": 5, "exhausted": 3}
    assert summary.services == {"guard": 8}
    assert summary.original_topics == {src: 7, "?": 1}
    assert [s.topic for s in await list_dlq(settings)] == [dlq]

    records = await read_dlq(settings, dlq, limit=100)
    assert len(records) == 8
    by_value = {r.value: r for r in records}
    for target_partition, key, value, orig, headers in sent:
        r = by_value[value]
        assert r.key == key and list(r.headers) == headers
        assert r.original_headers == orig
        assert r.dlt == DltHeaders(
            original_topic=src,
            original_partition=target_partition,
            original_offset=41,
            original_timestamp=1_700_000_000_000,
            original_consumer_group="guard",
            exception_fqcn="stratamesh.errors.DecodeError",
            exception_message="bad bytes \u2013 really",
            exception_stacktrace="Traceback ...",
            failure_class=r.dlt.failure_class,
            service="guard",
            attempt=r.dlt.attempt,
        )
        assert r.dlt.failure_class in {"poison", "exhausted"} and r.dlt.attempt in {1, 2, 3}
    page = await read_dlq(settings, src, offset=1, partition=0, limit=2)
    assert [(r.partition, r.offset) for r in page] == [(0, 1), (0, 2)]

    dry = await redrive(settings, dlq, dry_run=True)
    assert dry.redriven == {src: 7} and len(dry.skipped) == 1
    assert await true_end_offsets(settings, [TopicPartition(src, p) for p in range(3)]) == {
        TopicPartition(src, p): 0 for p in range(3)
    }

    done = await redrive(settings, src)
    assert done.redriven == {src: 7} and done.total == 7 and done.already_redriven == 0
    assert [s.reason for s in done.skipped] == [f"no {hdr.DLT_ORIGINAL_TOPIC} header"]
    assert done.committed == {0: 4, 1: 2, 2: 2}  # past the unroutable one too
    republished = await read_topic(settings, src, 3)
    assert len(republished) == 7
    got = {r.value: r for r in republished}
    for target_partition, key, value, orig, _ in sent:
        r = got[value]
        assert r.partition == target_partition
        assert r.key == key and r.value == value
        assert list(r.headers) == orig  # order, repeats, empty values: all unchanged

    again = await redrive(settings, dlq)
    assert again.total == 0 and again.already_redriven == 0 and not again.skipped
    assert len(await read_topic(settings, src, 3)) == 7
    [after] = await list_dlq(settings, dlq)
    assert after.records == 8 and after.pending == 0

    # A new dead letter is the only one redriven next time.
    late = original(50)
    await (
        await producer.send(
            dlq,
            value=b"late",
            key=b"req-50",
            partition=1,
            headers=dead_letter(late, topic=src, partition=b"1"),
        )
    )
    third = await redrive(settings, dlq)
    assert third.redriven == {src: 1} and third.records == [(1, 2)]
    assert len(await read_topic(settings, src, 3)) == 8


async def test_redrive_by_offset_is_remembered(
    settings: Settings, unique: str, producer: AIOKafkaProducer
) -> None:
    src = f"results-{unique}"
    dlq = f"{src}.dlq"
    await create_topic(settings, src, 2)
    await create_topic(settings, dlq, 2)
    for i in range(5):
        await producer.send(
            dlq,
            value=b"v%d" % i,
            key=b"k%d" % i,
            partition=0,
            headers=dead_letter(original(i), topic=src, partition=b"1"),
        )
    await producer.flush()
    group = f"redrive-{unique}"

    with pytest.raises(ConfigError, match=r"\(partition, offset\)"):
        await redrive(settings, dlq, [0], group=group)
    with pytest.raises(ConfigError, match="no record at offset"):
        await redrive(settings, dlq, [(0, 5)], group=group)
    with pytest.raises(ConfigError, match=r"partitions 0\.\.1"):
        await redrive(settings, dlq, [(2, 0)], group=group)
    with pytest.raises(ConfigError, match="nothing to redrive"):
        await redrive(settings, dlq, all=False, group=group)
    with pytest.raises(TopicNotFoundError):
        await redrive(settings, f"missing-{unique}", group=group)

    first = await redrive(settings, dlq, [(0, 0), (0, 1)], group=group)
    assert first.records == [(0, 0), (0, 1)] and first.committed == {0: 2}
    repeat = await redrive(settings, dlq, [(0, 1)], group=group)
    assert repeat.total == 0 and repeat.already_redriven == 1
    ahead = await redrive(settings, dlq, [(0, 3)], group=group)
    assert ahead.records == [(0, 3)] and ahead.committed == {0: 2}
    tp = TopicPartition(dlq, 0)
    kept = (await committed_offsets(settings, group, [tp]))[tp][1].startswith("strata-redriven:")
    rest = await redrive(settings, dlq, group=group)
    if kept:  # Apache Kafka keeps commit metadata: offset 3 is known to be done
        assert not ahead.warnings
        assert rest.records == [(0, 2), (0, 4)] and rest.already_redriven == 1
    else:  # Tansu drops it: said so, and 3 goes again (handlers are idempotent)
        assert ahead.warnings and "metadata" in ahead.warnings[0]
        assert rest.records == [(0, 2), (0, 3), (0, 4)]
    assert rest.committed == {0: 5}  # the empty partition 1 needs no commit
    values = [r.value for r in await read_topic(settings, src, 2)]
    assert sorted(set(values)) == [b"v0", b"v1", b"v2", b"v3", b"v4"]
    assert len(values) == (5 if kept else 6)
    # The default group was never touched.
    assert (await committed_offsets(settings, DEFAULT_REDRIVE_GROUP, [tp]))[tp][0] is None
