"""The bus: topics, envelope headers, codec, signed producer and the consumer middleware."""

from stratamesh.bus import headers, topics
from stratamesh.bus.codec import Codec
from stratamesh.bus.envelope import Envelope
from stratamesh.bus.middleware import Context, DeadLettered, Handled, Pipeline, Skipped
from stratamesh.bus.producer import MeshProducer, OutRecord
from stratamesh.bus.publish import Publisher, event_record, topic_of_event
from stratamesh.bus.runtime import KafkaRuntime
from stratamesh.bus.service import Service
from stratamesh.bus.topics import TOPICS, Stage, TopicSpec

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
