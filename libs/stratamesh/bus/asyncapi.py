"""The contract as documentation: an AsyncAPI 3.0 document of every topic (`strata docs`).

Built from the topic registry (channels, producers → send, consumers → receive), the Avro
schemas (message payloads) and the envelope headers, so it cannot drift from the code.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import Any

from stratamesh.bus import headers as hdr
from stratamesh.bus.topics import CLIENT_PRODUCER, TOPICS, TopicSpec
from stratamesh.events import load_schema

__all__ = ["asyncapi_document"]

AVRO_FORMAT = "application/vnd.apache.avro;version=1.9.0"

_HEADER_DOCS = {
    hdr.EVENT_TYPE: "Avro record name of the value",
    hdr.EVENT_ID: "UUIDv7 (ingress) or an id derived from the input event and the stage",
    hdr.REQUEST_ID: "request id; also the record key (request plane)",
    hdr.DOC_ID: "document id; also the record key (knowledge plane)",
    hdr.TENANT: "tenant (for client ingress: the tenant bound to the client key)",
    hdr.PRODUCER: "signing identity: `service`, `service.instance` or `client:<name>`",
    hdr.SIGNATURE: "Ed25519 batch signature and audit path over key, value and envelope",
    hdr.DEADLINE: "absolute deadline, epoch milliseconds",
    hdr.NEXT: "the next stage of the routing slip",
    hdr.TRACEPARENT: "W3C trace context",
    hdr.UNSIGNED_INGRESS: "`1` when derived from unsigned ingress (development only)",
    hdr.REPLAY: "replay id, set on records re-published by `strata replay copy`",
}


def _channel_id(name: str) -> str:
    return name.replace(".", "_")


def _headers_schema(spec: TopicSpec) -> dict[str, Any]:
    key_header = hdr.REQUEST_ID if spec.key == "request_id" else hdr.DOC_ID
    required = [
        hdr.EVENT_TYPE,
        hdr.EVENT_ID,
        key_header,
        hdr.TENANT,
        hdr.PRODUCER,
        hdr.SIGNATURE,
        hdr.TRACEPARENT,
    ]
    props = {
        name: {"type": "string", "description": doc}
        for name, doc in _HEADER_DOCS.items()
        if name not in (hdr.REQUEST_ID, hdr.DOC_ID) or name == key_header
    }
    return {"type": "object", "required": required, "properties": props}


def _actors(names: frozenset[str]) -> list[str]:
    return sorted("clients" if n == CLIENT_PRODUCER else n for n in names)


def asyncapi_document(bootstrap: str | None = None) -> dict[str, Any]:
    """The AsyncAPI 3.0.0 document of the mesh (a JSON-able dict)."""
    try:
        release = version("stratamesh")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        release = "0.0.0"
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    messages: dict[str, Any] = {}
    for spec in TOPICS:
        schema = load_schema(spec.event_type)
        messages[spec.event_type] = {
            "name": spec.event_type,
            "title": spec.event_type,
            "summary": schema.get("doc", ""),
            "contentType": "avro/binary",
            "headers": _headers_schema(spec),
            "payload": {"schemaFormat": AVRO_FORMAT, "schema": schema},
            "bindings": {"kafka": {"key": {"type": "string", "description": spec.key}}},
        }
        ref = {"$ref": f"#/components/messages/{spec.event_type}"}
        for name, desc, dlq in (
            (spec.name, spec.description, False),
            (spec.dlq, f"dead letters of {spec.name}", True),
        ):
            cid = _channel_id(name)
            channels[cid] = {
                "address": name,
                "description": desc
                + (" (original key, value and headers, plus strata-dlt-* headers)" if dlq else ""),
                "messages": {spec.event_type: ref},
                "bindings": {
                    "kafka": {
                        "topic": name,
                        "partitions": spec.partitions,
                        "topicConfiguration": {"retention.ms": spec.retention_ms},
                    }
                },
            }
        cid = _channel_id(spec.name)
        for actor in _actors(spec.producers):
            operations[f"{actor}_sends_{cid}"] = {
                "action": "send",
                "channel": {"$ref": f"#/channels/{cid}"},
                "summary": f"{actor} publishes {spec.event_type}",
            }
        for actor in _actors(spec.consumers):
            operations[f"{actor}_receives_{cid}"] = {
                "action": "receive",
                "channel": {"$ref": f"#/channels/{cid}"},
                "summary": f"{actor} consumes {spec.event_type}",
            }
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "stratamesh",
            "version": release,
            "description": "Every topic of the mesh, its Avro event, producers and consumers. "
            "Values use Avro single-object encoding (or the Confluent wire format when a "
            "schema registry is configured); every record is signed by its producer.",
        },
        "servers": {"kafka": {"host": bootstrap or "localhost:9092", "protocol": "kafka"}},
        "defaultContentType": "avro/binary",
        "channels": channels,
        "operations": operations,
        "components": {"messages": messages},
    }
