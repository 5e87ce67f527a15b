"""Writing and reading raw records on the real embedded broker, for integration tests."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

from aiokafka import AIOKafkaProducer, TopicPartition

from stratamesh.bus.offsets import iter_records, open_consumer, true_end_offsets
from stratamesh.config import Settings

# Every record produced by a test gets its own key, whatever the call or the test.
_KEYS = itertools.count()


async def produce_batch(
    producer: AIOKafkaProducer,
    topic: str,
    partition: int,
    timestamps: Sequence[int],
    *,
    value_prefix: bytes = b"",
    headers: Sequence[tuple[str, bytes]] | None = None,
) -> None:
    """One record batch per call (several records in ONE batch: what Tansu's ListOffsets gets
    wrong), one record per timestamp, each with that CreateTime.

    Record ``i`` of the call has a key no other record has, the value ``value_prefix + b"<i>"``
    and the given headers (by default ``[("n", b"<i>")]``).
    """
    batch = producer.create_batch()
    for i, ts in enumerate(timestamps):
        assert (
            batch.append(
                key=b"key-%d-%d-%d" % (partition, ts, next(_KEYS)),
                value=value_prefix + b"%d" % i,
                timestamp=ts,
                headers=list(headers) if headers is not None else [("n", b"%d" % i)],
            )
            is not None
        )
    batch.close()
    await (await producer.send_batch(batch, topic, partition=partition))


async def read_topic(settings: Settings, topic: str, partitions: int) -> list[Any]:
    """Every record of partitions ``0..partitions-1`` of ``topic``, from offset 0 to the true
    end: in offset order within a partition, partitions interleaved."""
    tps = [TopicPartition(topic, p) for p in range(partitions)]
    ends = await true_end_offsets(settings, tps)
    out: list[Any] = []
    async with open_consumer(settings) as consumer:
        async for _, records in iter_records(consumer, {tp: (0, ends[tp]) for tp in tps}):
            out.extend(records)
    return out
