"""Reading topics for people: decoded records with their headers (`strata tail`)."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition

from stratamesh.bus import headers as H
from stratamesh.bus.clients import consumer_config
from stratamesh.bus.codec import Codec
from stratamesh.bus.offsets import true_end_offsets
from stratamesh.config import Settings
from stratamesh.errors import BrokerError, DecodeError

__all__ = ["describe_record", "tail_records"]

_BINARY_HEADERS = {H.SIGNATURE}


def describe_record(record: Any, codec: Codec) -> dict[str, Any]:
    """A JSON-able view of a record: position, key, headers and the decoded event."""
    headers: dict[str, str] = {}
    for k, v in record.headers:
        if k in _BINARY_HEADERS:
            headers[k] = base64.b64encode(v).decode()[:24] + "…"
        else:
            headers[k] = v.decode("utf-8", "replace")
    view: dict[str, Any] = {
        "topic": record.topic,
        "partition": record.partition,
        "offset": record.offset,
        "timestamp": record.timestamp,
        "key": record.key.decode("utf-8", "replace") if record.key is not None else None,
        "headers": headers,
    }
    try:
        view["event"] = codec.decode(record.value or b"").model_dump(mode="json")
    except DecodeError as exc:
        view["undecodable"] = str(exc)
        view["value_b64"] = base64.b64encode(record.value or b"").decode()
    return view


async def tail_records(
    settings: Settings,
    topic_name: str,
    *,
    from_beginning: bool = False,
    follow: bool = False,
    limit: int | None = None,
    idle_ms: int = 1000,
) -> AsyncIterator[dict[str, Any]]:
    """Yield records of every partition of ``topic_name`` (no consumer group, nothing committed).

    Without ``follow`` it stops once every partition reached the end it had at the start.
    """
    codec = Codec.from_settings(settings)
    consumer = AIOKafkaConsumer(**consumer_config(settings, None))
    try:
        await consumer.start()
    except Exception as exc:
        await consumer.stop()
        raise BrokerError(
            f"cannot reach the broker at {settings.bootstrap_servers}: {exc}"
        ) from exc
    try:
        partitions = consumer.partitions_for_topic(topic_name)
        if not partitions:
            raise BrokerError(f"topic {topic_name!r} does not exist (strata topics list)")
        tps = [TopicPartition(topic_name, p) for p in sorted(partitions)]
        consumer.assign(tps)
        ends = await true_end_offsets(consumer, tps)
        if from_beginning:
            await consumer.seek_to_beginning(*tps)
        else:
            for tp in tps:
                consumer.seek(tp, ends[tp])
        remaining = {tp for tp in tps if from_beginning and ends[tp] > await consumer.position(tp)}
        count = 0
        idle = 0
        while follow or remaining:
            batch = await consumer.getmany(timeout_ms=200)
            if not batch:
                idle += 200
                if not follow and idle >= idle_ms * 10:
                    return
                continue
            idle = 0
            for tp, records in batch.items():
                for record in records:
                    yield describe_record(record, codec)
                    count += 1
                    if limit is not None and count >= limit:
                        return
                    if record.offset + 1 >= ends[tp]:
                        remaining.discard(tp)
    finally:
        await consumer.stop()
