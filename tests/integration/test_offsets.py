"""True end offsets and timestamp lookups against the real embedded broker (Tansu)."""

from __future__ import annotations

import random
from collections.abc import Sequence

import pytest
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.structs import OffsetAndTimestamp

from stratamesh.bus.admin import create_topic, list_topics
from stratamesh.bus.offsets import (
    TopicNotFoundError,
    commit_offsets,
    offset_bounds,
    offset_for_timestamp,
    offsets_for_timestamp,
    open_consumer,
    topic_partitions,
    true_end_offsets,
)
from stratamesh.config import Settings
from tests.integration.records import produce_batch

BASE_TS = 1_700_000_000_000


async def test_true_end_offsets_after_batched_produce(
    settings: Settings, unique: str, producer: AIOKafkaProducer
) -> None:
    topic = f"offsets-end-{unique}"
    assert await create_topic(settings, topic, 4)
    await produce_batch(producer, topic, 0, [BASE_TS] * 5)
    await produce_batch(producer, topic, 0, [BASE_TS] * 7)
    await produce_batch(producer, topic, 0, [BASE_TS] * 3)
    await produce_batch(producer, topic, 1, [BASE_TS])
    await produce_batch(producer, topic, 2, [BASE_TS] * 9)
    await produce_batch(producer, topic, 2, [BASE_TS])  # last batch of one record
    tps = [TopicPartition(topic, p) for p in range(4)]
    expected = {tps[0]: 15, tps[1]: 1, tps[2]: 10, tps[3]: 0}

    assert await true_end_offsets(settings, tps) == expected

    # Through a caller's consumer: same answer, and its assignment is given back.
    async with open_consumer(settings) as consumer:
        other = TopicPartition(topic, 3)
        consumer.assign([other])
        assert await true_end_offsets(consumer, tps[:3]) == {tp: expected[tp] for tp in tps[:3]}
        assert consumer.assignment() == {other}
        naive = await consumer.end_offsets(tps)
    bounds = await offset_bounds(settings, tps)
    assert {tp: (b.begin, b.end, b.count) for tp, b in bounds.items()} == {
        tp: (0, e, e) for tp, e in expected.items()
    }
    assert {tp: b.reported_end for tp, b in bounds.items()} == naive
    # Information only (do not assert the broker bug; it may get fixed):
    print(
        "ListOffsets(latest) answered",
        {tp.partition: o for tp, o in naive.items()},
        "true ends",
        {tp.partition: o for tp, o in expected.items()},
    )


def first_at_or_after(timestamps: Sequence[int], target: int) -> int:
    """Kafka's definition: the first offset whose timestamp is >= target (end if none)."""
    return next((i for i, ts in enumerate(timestamps) if ts >= target), len(timestamps))


async def test_offset_for_timestamp_many_targets(
    settings: Settings, unique: str, producer: AIOKafkaProducer
) -> None:
    topic = f"offsets-ts-{unique}"
    assert await create_topic(settings, topic, 2)
    rng = random.Random(7)
    # Partition 0: 120 non-decreasing timestamps (with repeats and gaps) in batches of 1..17.
    ts0: list[int] = []
    t = BASE_TS
    for _ in range(120):
        t += rng.choice([0, 1, 10, 1000, 5000])
        ts0.append(t)
    i = 0
    while i < len(ts0):
        n = rng.randint(1, 17)
        await produce_batch(producer, topic, 0, ts0[i : i + n])
        i += n
    tp0, tp1 = TopicPartition(topic, 0), TopicPartition(topic, 1)

    # Check the helper's timestamps really are CreateTime as given.
    async with open_consumer(settings) as consumer:
        consumer.assign([tp0])
        consumer.seek(tp0, 0)
        got: list[int] = []
        while len(got) < len(ts0):
            for records in (await consumer.getmany(timeout_ms=500)).values():
                got += [r.timestamp for r in records]
        assert got == ts0

        targets = sorted(
            {
                BASE_TS - 1,
                BASE_TS,
                ts0[0],
                ts0[-1],
                ts0[-1] + 1,
                *rng.sample(ts0, 25),
                *(x + 1 for x in rng.sample(ts0, 25)),
                *(x - 1 for x in rng.sample(ts0, 10)),
            }
        )
        for target in targets:
            want = first_at_or_after(ts0, target)
            assert await offset_for_timestamp(consumer, tp0, target) == want, target
            assert await offset_for_timestamp(consumer, tp0, target, skew_ms=0) == want, target
        # An empty partition answers its end (0), whatever the target.
        assert await offsets_for_timestamp(consumer, [tp0, tp1], ts0[60]) == {
            tp0: first_at_or_after(ts0, ts0[60]),
            tp1: 0,
        }
    # With Settings instead of a consumer.
    assert await offset_for_timestamp(settings, tp0, ts0[-1] + 1) == len(ts0)


async def test_offset_for_timestamp_with_mild_disorder(
    settings: Settings, unique: str, producer: AIOKafkaProducer
) -> None:
    """CreateTime from several producers is out of order by a little: still exact within skew."""
    topic = f"offsets-skew-{unique}"
    assert await create_topic(settings, topic, 1)
    rng = random.Random(11)
    ts = [BASE_TS + i * 100 + rng.randint(-400, 400) for i in range(200)]  # disorder <= 800 ms
    for i in range(0, len(ts), 25):
        await produce_batch(producer, topic, 0, ts[i : i + 25])
    tp = TopicPartition(topic, 0)
    async with open_consumer(settings) as consumer:
        for target in range(BASE_TS - 500, BASE_TS + 20_500, 370):
            want = first_at_or_after(ts, target)
            assert await offset_for_timestamp(consumer, tp, target, skew_ms=1_000) == want
            # Without skew correction the result is still a boundary.
            got = await offset_for_timestamp(consumer, tp, target, skew_ms=0)
            assert got >= want
            assert got == len(ts) or ts[got] >= target
            assert got == 0 or ts[got - 1] < target


async def test_offsets_for_missing_topic_raise_instead_of_creating_it(
    settings: Settings, unique: str
) -> None:
    missing = TopicPartition(f"missing-{unique}", 0)
    async with open_consumer(settings) as consumer:
        with pytest.raises(TopicNotFoundError, match="does not exist"):
            await topic_partitions(consumer, missing.topic)
    with pytest.raises(TopicNotFoundError, match="does not exist"):
        await true_end_offsets(settings, [missing])
    with pytest.raises(TopicNotFoundError, match="does not exist"):
        await offset_for_timestamp(settings, missing, BASE_TS)
    with pytest.raises(TopicNotFoundError, match="does not exist"):
        await commit_offsets(settings, f"g-{unique}", {missing: 0})
    assert missing.topic not in await list_topics(settings)
    await create_topic(settings, missing.topic, 2)
    with pytest.raises(TopicNotFoundError, match="no partition 5"):
        await true_end_offsets(settings, [TopicPartition(missing.topic, 5)])


class KafkaLikeAnswers:
    """A real consumer whose ListOffsets answers are replaced, to drive both code paths."""

    def __init__(self, consumer: object, by_time: dict[int, int | None]) -> None:
        self._consumer = consumer
        self._by_time = by_time
        self.asked = 0

    def __getattr__(self, name: str) -> object:
        return getattr(self._consumer, name)

    async def offsets_for_times(
        self, query: dict[TopicPartition, int]
    ) -> dict[TopicPartition, OffsetAndTimestamp | None]:
        self.asked += 1
        out: dict[TopicPartition, OffsetAndTimestamp | None] = {}
        for tp, ts in query.items():
            o = self._by_time[ts]
            out[tp] = None if o is None else OffsetAndTimestamp(o, ts)
        return out


async def test_right_broker_answers_are_verified_without_searching(
    settings: Settings, unique: str, producer: AIOKafkaProducer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On Apache Kafka the broker's answer is right: it is checked, not searched for."""
    import stratamesh.bus.offsets as offsets_mod

    topic = f"offsets-kafka-{unique}"
    assert await create_topic(settings, topic, 1)
    ts = [BASE_TS + 1000 * i for i in range(40)]
    for i in range(0, 40, 8):
        await produce_batch(producer, topic, 0, ts[i : i + 8])
    tp = TopicPartition(topic, 0)
    searches: list[int] = []
    real_search = offsets_mod._search

    async def counting_search(*args: object, **kw: object) -> int:
        searches.append(1)
        return await real_search(*args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(offsets_mod, "_search", counting_search)
    targets = [BASE_TS - 5, BASE_TS + 500, BASE_TS + 17_000, BASE_TS + 39_000, BASE_TS + 99_000]
    right = {t: (first_at_or_after(ts, t) if t <= ts[-1] else None) for t in targets}
    async with open_consumer(settings) as consumer:
        kafka = KafkaLikeAnswers(consumer, right)
        for t in targets:
            assert await offset_for_timestamp(kafka, tp, t) == first_at_or_after(ts, t)
        assert searches == [] and kafka.asked == len(targets)
        # Wrong answers (too late, too early, "none") are caught and searched.
        wrong = {BASE_TS + 17_000: 30, BASE_TS + 25_500: 3, BASE_TS + 500: None}
        liar = KafkaLikeAnswers(consumer, wrong)
        for t in wrong:
            assert await offset_for_timestamp(liar, tp, t) == first_at_or_after(ts, t)
        assert len(searches) == len(wrong)
