"""Turning an event into a record, and the publisher that clients and tools use."""

from __future__ import annotations

from aiokafka.structs import RecordMetadata

from stratamesh.bus import headers as H
from stratamesh.bus.codec import Codec
from stratamesh.bus.producer import MeshProducer, OutRecord
from stratamesh.bus.topics import TOPICS, topic
from stratamesh.config import Settings
from stratamesh.errors import EncodeError
from stratamesh.events import Event
from stratamesh.obs.tracing import TraceContext, new_traceparent
from stratamesh.security.keys import SigningKey, load_signing_key

__all__ = ["Publisher", "event_record", "topic_of_event"]

_EVENT_TOPICS: dict[str, str] = {}
for _spec in TOPICS:
    _EVENT_TOPICS.setdefault(_spec.event_type, _spec.name)


def topic_of_event(event_type: str) -> str:
    """The registry topic that carries ``event_type``."""
    try:
        return _EVENT_TOPICS[event_type]
    except KeyError:
        raise EncodeError(f"no topic carries {event_type}") from None


def event_record(
    codec: Codec,
    producer: str,
    event: Event,
    topic_name: str,
    *,
    next_stage: str | None = None,
    trace: TraceContext | None = None,
    deadline_ms: int | None = None,
    replay: bytes | None = None,
    unsigned_ingress: bool = False,
) -> OutRecord:
    """The record for ``event`` with the envelope headers of DESIGN.md §2 (signed on send)."""
    spec = topic(topic_name)
    if spec.event_type != event.EVENT_TYPE:
        raise EncodeError(f"{spec.name} carries {spec.event_type}, not {event.EVENT_TYPE}")
    if getattr(event, "producer", producer) != producer:
        # The payload names its producer too (for audit and replay); the envelope is the truth.
        event = event.model_copy(update={"producer": producer})
    key = event.key.encode()
    hdrs: list[tuple[str, bytes]] = [
        (H.EVENT_TYPE, event.EVENT_TYPE.encode()),
        (H.EVENT_ID, event.event_id.encode()),
        (H.REQUEST_ID if spec.key == "request_id" else H.DOC_ID, key),
        (H.TENANT, event.tenant.encode()),
        (H.PRODUCER, producer.encode()),
        (H.TRACEPARENT, trace.header if trace is not None else new_traceparent()),
    ]
    if deadline_ms is not None:
        hdrs.append((H.DEADLINE, str(deadline_ms).encode()))
    if next_stage:
        hdrs.append((H.NEXT, next_stage.encode()))
    if unsigned_ingress:
        hdrs.append((H.UNSIGNED_INGRESS, b"1"))
    if replay is not None:
        hdrs.append((H.REPLAY, replay))
    return OutRecord(topic_name, key, codec.encode(event, topic=topic_name), hdrs)


class Publisher:
    """Publishes signed events as one identity: a client (``client:<name>``) or a service.

    ``async with Publisher(settings, "client:acme-web") as pub: await pub.publish(event)``
    """

    def __init__(
        self,
        settings: Settings,
        identity: str,
        *,
        signing_key: SigningKey | None = None,
        codec: Codec | None = None,
        unsigned: bool = False,
    ) -> None:
        self.settings = settings
        self.identity = identity
        self.unsigned = unsigned
        key = None if unsigned else (signing_key or load_signing_key(settings, identity))
        self.codec = codec or Codec.from_settings(settings)
        self.producer = MeshProducer(settings, key, service=identity)

    async def __aenter__(self) -> Publisher:
        await self.producer.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.producer.stop()

    def record(
        self,
        event: Event,
        *,
        topic_name: str | None = None,
        next_stage: str | None = None,
        deadline_ms: int | None = None,
    ) -> OutRecord:
        name = topic_name or topic_of_event(event.EVENT_TYPE)
        rec = event_record(
            self.codec, self.identity, event, name, next_stage=next_stage, deadline_ms=deadline_ms
        )
        rec.sign = not self.unsigned
        return rec

    async def publish(
        self,
        event: Event,
        *,
        topic_name: str | None = None,
        next_stage: str | None = None,
        deadline_ms: int | None = None,
    ) -> RecordMetadata:
        """Send ``event`` and wait for the broker's acknowledgement."""
        return await self.producer.send(
            self.record(
                event, topic_name=topic_name, next_stage=next_stage, deadline_ms=deadline_ms
            )
        )
