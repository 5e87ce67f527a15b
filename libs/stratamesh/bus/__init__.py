"""The bus: topics, envelope headers, codec, signed producer and the consumer middleware.

Names are imported lazily, so that ``stratamesh.bus.headers`` and ``stratamesh.bus.topics``
(plain constants, used by ``stratamesh.security`` too) never pull in the Kafka client.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from stratamesh.bus import headers, topics
    from stratamesh.bus.codec import Codec
    from stratamesh.bus.envelope import Envelope
    from stratamesh.bus.middleware import Context, DeadLettered, Handled, Pipeline, Skipped
    from stratamesh.bus.producer import MeshProducer, OutRecord
    from stratamesh.bus.publish import Publisher, event_record, topic_of_event
    from stratamesh.bus.runtime import KafkaRuntime
    from stratamesh.bus.service import Service
    from stratamesh.bus.topics import TOPICS, Stage, TopicSpec

_WHERE = {
    "headers": "stratamesh.bus.headers",
    "topics": "stratamesh.bus.topics",
    "Codec": "stratamesh.bus.codec",
    "Envelope": "stratamesh.bus.envelope",
    "Context": "stratamesh.bus.middleware",
    "DeadLettered": "stratamesh.bus.middleware",
    "Handled": "stratamesh.bus.middleware",
    "Pipeline": "stratamesh.bus.middleware",
    "Skipped": "stratamesh.bus.middleware",
    "MeshProducer": "stratamesh.bus.producer",
    "OutRecord": "stratamesh.bus.producer",
    "Publisher": "stratamesh.bus.publish",
    "event_record": "stratamesh.bus.publish",
    "topic_of_event": "stratamesh.bus.publish",
    "KafkaRuntime": "stratamesh.bus.runtime",
    "Service": "stratamesh.bus.service",
    "TOPICS": "stratamesh.bus.topics",
    "Stage": "stratamesh.bus.topics",
    "TopicSpec": "stratamesh.bus.topics",
}

__all__ = [
    "TOPICS",
    "Codec",
    "Context",
    "DeadLettered",
    "Envelope",
    "Handled",
    "KafkaRuntime",
    "MeshProducer",
    "OutRecord",
    "Pipeline",
    "Publisher",
    "Service",
    "Skipped",
    "Stage",
    "TopicSpec",
    "event_record",
    "headers",
    "topic_of_event",
    "topics",
]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'stratamesh.bus' has no attribute {name!r}")
    if name in ("headers", "topics"):
        return importlib.import_module(module)
    return getattr(importlib.import_module(module), name)
