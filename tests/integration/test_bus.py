"""The bus against the real embedded broker: round trips, DLQ, retries, security, dedupe."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiokafka import AIOKafkaConsumer

from stratamesh.bus import headers as H
from stratamesh.bus import topics as T
from stratamesh.bus.clients import consumer_config
from stratamesh.bus.codec import Codec
from stratamesh.bus.middleware import Context
from stratamesh.bus.service import Service
from stratamesh.config import Settings
from stratamesh.errors import Transient
from stratamesh.events import (
    EVENT_TYPES,
    CompletionStatus,
    DocumentChunked,
    InferenceRequested,
    RequestAdmitted,
    RequestCompleted,
)
from stratamesh.events.testing import sample_event
from stratamesh.security.keys import Keyring, generate_identity
from stratamesh.security.signing import leaf_hash, verify_record
from tests.integration.conftest import Env


async def eventually(check: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


async def read_all(
    settings: Settings, topic_name: str, expect: int, timeout: float = 15.0
) -> list[Any]:
    """Every record of ``topic_name`` (waits until at least ``expect`` arrived)."""
    consumer = AIOKafkaConsumer(topic_name, **consumer_config(settings, None))
    await consumer.start()
    records: list[Any] = []
    try:
        deadline = time.monotonic() + timeout
        while len(records) < expect and time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=200)
            for recs in batch.values():
                records.extend(recs)
        return records
    finally:
        await consumer.stop()


def recorder(
    seen: list[Any], fn: Callable[[Any, Context], Awaitable[None]] | None = None
) -> Callable[[Any, Context], Awaitable[None]]:
    async def handler(event: Any, ctx: Context) -> None:
        if fn is not None:
            await fn(event, ctx)
        seen.append((event, ctx.tenant, ctx.envelope))

    return handler


async def test_every_event_type_round_trips_through_the_broker(env: Env) -> None:
    codec = Codec()
    sent = {}
    for spec in T.TOPICS:
        producer = (
            sorted(p for p in spec.producers if p != T.CLIENT_PRODUCER)[0]
            if spec.producers - {T.CLIENT_PRODUCER}
            else None
        )
        if T.CLIENT_PRODUCER in spec.producers:
            identity = env.client(f"c-{spec.name.replace('.', '-')}", "t1")
        else:
            assert producer is not None
            identity = producer
        pub = await env.publisher(identity)
        event = sample_event(EVENT_TYPES[spec.event_type])
        await pub.publish(event)
        sent[spec.name] = (identity, event)
    ring = Keyring.load(env.settings.keys_dir)
    for name, (identity, event) in sent.items():
        [record] = await read_all(env.settings, name, 1)
        decoded = codec.decode(record.value)
        assert decoded == event.model_copy(update={"producer": identity})
        hdrs = H.header_dict(record.headers)
        assert hdrs[H.EVENT_TYPE] == event.EVENT_TYPE.encode()
        assert hdrs[H.EVENT_ID] == event.event_id.encode()
        assert hdrs[H.PRODUCER] == identity.encode()
        assert record.key == event.key.encode()
        verify_record(ring, identity, leaf_hash(record.key, record.value, hdrs), hdrs[H.SIGNATURE])


async def test_poison_message_goes_to_dlq_and_the_consumer_goes_on(env: Env) -> None:
    client = env.client("web", "acme")
    pub = await env.publisher(client)
    seen: list[Any] = []
    svc = Service("guard")
    svc.subscribe(T.REQUESTS_SUBMITTED)(recorder(seen))
    await env.start(svc)
    first = sample_event(InferenceRequested, request_id="r-1")
    poison = pub.record(sample_event(InferenceRequested, request_id="r-1"))
    poison.value = b"\xc3\x01not avro at all"
    last = sample_event(InferenceRequested, request_id="r-1")
    await pub.publish(first)
    await pub.producer.send(poison)
    await pub.publish(last)
    await eventually(lambda: len(seen) == 2)
    assert [e.event_id for e, *_ in seen] == [first.event_id, last.event_id]
    [dead] = await read_all(env.settings, T.dlq_of(T.REQUESTS_SUBMITTED), 1)
    assert dead.key == poison.key and dead.value == poison.value
    hdrs = H.header_dict(dead.headers)
    assert hdrs[H.DLT_FAILURE_CLASS] == b"poison"
    assert hdrs[H.DLT_ORIGINAL_TOPIC] == T.REQUESTS_SUBMITTED.encode()
    assert hdrs[H.DLT_ORIGINAL_CONSUMER_GROUP] == b"guard"
    assert hdrs[H.DLT_SERVICE] == b"guard"
    assert hdrs[H.DLT_EXCEPTION_FQCN] == b"stratamesh.errors.DecodeError"
    assert int(hdrs[H.DLT_ORIGINAL_OFFSET]) >= 0 and hdrs[H.DLT_EXCEPTION_STACKTRACE]
    # the original envelope survives, signature included, so a redrive verifies again
    assert hdrs[H.SIGNATURE] == H.header_dict(poison.headers)[H.SIGNATURE]


async def test_transient_failure_is_retried_without_stalling_other_partitions(env: Env) -> None:
    settings = env.settings.model_copy(
        update={"retry": env.settings.retry.model_copy(update={"attempts": 3})}
    )
    client = env.client("web", "acme")
    pub = await env.publisher(client)
    flaky = sample_event(InferenceRequested, request_id="flaky")
    md = await pub.publish(flaky)
    others = []
    i = 0
    while len(others) < 6:
        ev = sample_event(InferenceRequested, request_id=f"other-{i}")
        i += 1
        if (await pub.publish(ev)).partition != md.partition:
            others.append(ev)
    failures: list[float] = []
    done: dict[str, float] = {}

    async def handler(event: Any, ctx: Context) -> None:
        if event.event_id == flaky.event_id and len(failures) < 2:
            failures.append(time.monotonic())
            raise Transient("model server returned 503", retry_after=1.5)
        done[event.event_id] = time.monotonic()

    svc = Service("guard")
    svc.subscribe(T.REQUESTS_SUBMITTED)(handler)
    await env.start(svc, settings)
    await eventually(lambda: flaky.event_id in done, timeout=30)
    assert len(failures) == 2
    assert failures[1] - failures[0] >= 1.4  # the backoff was honoured
    assert done[flaky.event_id] - failures[0] >= 2.9
    # the other partitions did not wait for the flaky record's backoff
    others_done = [done[e.event_id] for e in others]
    assert max(others_done) < failures[0] + 1.4


async def test_exhausted_retries_land_in_dlq_and_redrive_reprocesses(env: Env) -> None:
    from stratamesh.bus.dlq import redrive

    settings = env.settings.model_copy(
        update={
            "retry": env.settings.retry.model_copy(update={"attempts": 2, "base_delay_s": 0.05})
        }
    )
    client = env.client("web", "acme")
    pub = await env.publisher(client)
    healthy = {"up": False}
    seen: list[Any] = []

    async def handler(event: Any, ctx: Context) -> None:
        if not healthy["up"]:
            raise ConnectionError("dependency down")
        seen.append(event.event_id)

    svc = Service("guard")
    svc.subscribe(T.REQUESTS_SUBMITTED)(handler)
    await env.start(svc, settings)
    event = sample_event(InferenceRequested)
    await pub.publish(event)
    [dead] = await read_all(env.settings, T.dlq_of(T.REQUESTS_SUBMITTED), 1)
    hdrs = H.header_dict(dead.headers)
    assert hdrs[H.DLT_FAILURE_CLASS] == b"exhausted" and hdrs[H.ATTEMPT] == b"2"
    assert seen == []
    healthy["up"] = True
    summary = await redrive(env.settings, T.dlq_of(T.REQUESTS_SUBMITTED))
    assert summary
    await eventually(lambda: seen == [event.event_id])


async def test_forged_unknown_and_unauthorized_producers_are_rejected(
    env: Env, tmp_path: Any
) -> None:
    client = env.client("web", "acme")
    seen: list[Any] = []
    svc = Service("guard")
    svc.subscribe(T.REQUESTS_SUBMITTED)(recorder(seen))
    await env.start(svc)
    # a service that may not write requests.submitted
    route = await env.publisher("route")
    await route.publish(sample_event(InferenceRequested))
    # a key the consumers never trusted, claiming to be the registered client
    rogue = generate_identity(tmp_path / "rogue", "rogue")
    from stratamesh.bus.publish import Publisher

    forger = Publisher(env.settings, client, signing_key=rogue)
    await forger.__aenter__()
    env.publishers.append(forger)
    await forger.publish(sample_event(InferenceRequested))
    # a client nobody registered
    stranger = Publisher(env.settings, "client:stranger", signing_key=rogue)
    await stranger.__aenter__()
    env.publishers.append(stranger)
    await stranger.publish(sample_event(InferenceRequested))
    # and one honest record, whose payload claims another tenant
    honest = await env.publisher(client)
    claim = sample_event(InferenceRequested, tenant="someone-else")
    await honest.publish(claim)
    dead = await read_all(env.settings, T.dlq_of(T.REQUESTS_SUBMITTED), 3)
    classes = [H.header_dict(d.headers)[H.DLT_FAILURE_CLASS] for d in dead]
    assert classes == [b"security"] * 3
    await eventually(lambda: len(seen) == 1)
    event, tenant, _ = seen[0]
    assert event.event_id == claim.event_id
    assert tenant == "acme" and event.tenant == "acme"  # the key decides, not the payload


async def test_unsigned_ingress_is_off_by_default_and_marked_when_on(env: Env) -> None:
    anon = await env.publisher("client:anonymous", unsigned=True)
    seen: list[Any] = []

    async def forward(event: Any, ctx: Context) -> None:
        ctx.publish(
            sample_event(
                RequestAdmitted,
                event_id=ctx.derive_id(),
                request_id=event.request_id,
                tenant=ctx.tenant,
            )
        )

    strict = Service("guard")
    strict.subscribe(T.REQUESTS_SUBMITTED)(recorder(seen))
    await env.start(strict)
    await anon.publish(sample_event(InferenceRequested, tenant="dev"))
    [dead] = await read_all(env.settings, T.dlq_of(T.REQUESTS_SUBMITTED), 1)
    assert H.header_dict(dead.headers)[H.DLT_FAILURE_CLASS] == b"security"
    assert seen == []

    lax_settings = env.settings.model_copy(
        update={
            "security": env.settings.security.model_copy(update={"allow_unsigned_ingress": True})
        }
    )
    lax = Service("guard", group="guard-dev")
    lax.subscribe(T.REQUESTS_SUBMITTED)(forward)
    await env.start(lax, lax_settings)
    [out] = await read_all(env.settings, T.REQUESTS_ADMITTED, 1)
    assert H.header_dict(out.headers)[H.UNSIGNED_INGRESS] == b"1"
    admitted = Codec().decode(out.value)
    assert getattr(admitted, "unsigned_ingress", True) is True
    assert admitted.tenant == "dev"


async def test_redelivered_event_has_no_second_effect(env: Env) -> None:
    client = env.client("web", "acme")
    pub = await env.publisher(client)
    seen: list[Any] = []
    svc = Service("guard")
    svc.subscribe(T.REQUESTS_SUBMITTED)(recorder(seen))
    await env.start(svc)
    event = sample_event(InferenceRequested)
    for _ in range(3):
        await pub.publish(event)  # the same event id three times (a client retrying)
    marker = sample_event(InferenceRequested)
    await pub.publish(marker)
    await eventually(lambda: any(e.event_id == marker.event_id for e, *_ in seen))
    await asyncio.sleep(0.3)
    assert [e.event_id for e, *_ in seen].count(event.event_id) == 1


async def test_expired_request_gets_an_expired_result_and_stage_filter_skips(env: Env) -> None:
    client = env.client("web", "acme")
    pub = await env.publisher(client)
    seen: list[Any] = []
    svc = Service("guard")
    svc.subscribe(T.REQUESTS_SUBMITTED, stage=T.Stage.GUARD_IN)(recorder(seen))
    await env.start(svc)
    expired = sample_event(InferenceRequested)
    await pub.publish(expired, deadline_ms=int(time.time() * 1000) - 1000)
    other_stage = pub.record(sample_event(InferenceRequested), next_stage="somebody_else")
    other_stage.value = b"never decoded"
    await pub.producer.send(other_stage)
    mine = sample_event(InferenceRequested)
    await pub.publish(mine, next_stage=T.Stage.GUARD_IN)
    await eventually(lambda: len(seen) == 1)
    assert seen[0][0].event_id == mine.event_id
    # Errors as data: the request ends with one `expired` result, not a DLQ record, and the
    # result carries no deadline header (late readers must not refuse it).
    [record] = await read_all(env.settings, T.RESULTS, 1, timeout=5)
    hdrs = H.header_dict(record.headers)
    assert H.DEADLINE not in hdrs and hdrs[H.PRODUCER] == b"guard"
    result = Codec.from_settings(env.settings).decode(record.value)
    assert isinstance(result, RequestCompleted) and result.status == CompletionStatus.EXPIRED
    assert result.request_id == expired.request_id and result.tenant == "acme"
    assert "deadline passed at stage guard" in (result.reason or "")
    assert await read_all(env.settings, T.dlq_of(T.REQUESTS_SUBMITTED), 1, timeout=1) == []


async def test_expired_knowledge_event_goes_to_the_dlq(env: Env) -> None:
    pub = await env.publisher("ingest")
    seen: list[Any] = []
    svc = Service("embed")
    svc.subscribe(T.DOCS_CHUNKED)(recorder(seen))
    await env.start(svc)
    await pub.publish(sample_event(DocumentChunked), deadline_ms=int(time.time() * 1000) - 1000)
    dead = await read_all(env.settings, T.dlq_of(T.DOCS_CHUNKED), 1, timeout=5)
    assert [H.header_dict(d.headers)[H.DLT_FAILURE_CLASS] for d in dead] == [b"deadline"]
    assert seen == []


async def test_batched_subscription_gets_micro_batches_from_the_broker(env: Env) -> None:
    client = env.client("web", "acme")
    pub = await env.publisher(client)
    events = [sample_event(InferenceRequested, request_id="same-partition") for _ in range(40)]
    for ev in events:
        pub.producer.send(pub.record(ev))
    await pub.producer.flush()
    sizes: list[int] = []
    seen: list[str] = []

    async def handler(items: list[tuple[Any, Context]]) -> None:
        sizes.append(len(items))
        seen.extend(e.event_id for e, _ in items)

    svc = Service("guard")
    svc.subscribe(T.REQUESTS_SUBMITTED, batch_size=16, batch_wait_ms=50)(handler)
    await env.start(svc)
    await eventually(lambda: len(seen) == 40)
    assert seen == [e.event_id for e in events]  # one partition: order kept
    assert max(sizes) == 16 and len(sizes) <= 5
