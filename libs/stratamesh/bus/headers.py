"""Envelope header names (DESIGN.md §2).  Every header the mesh reads or writes is named here."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

__all__ = [
    "ATTEMPT",
    "DEADLINE",
    "DLT_EXCEPTION_FQCN",
    "DLT_EXCEPTION_MESSAGE",
    "DLT_EXCEPTION_STACKTRACE",
    "DLT_FAILURE_CLASS",
    "DLT_ORIGINAL_CONSUMER_GROUP",
    "DLT_ORIGINAL_OFFSET",
    "DLT_ORIGINAL_PARTITION",
    "DLT_ORIGINAL_TIMESTAMP",
    "DLT_ORIGINAL_TOPIC",
    "DLT_PREFIX",
    "DLT_SERVICE",
    "DOC_ID",
    "EVENT_ID",
    "EVENT_TYPE",
    "NEXT",
    "PRODUCER",
    "REPLAY",
    "REQUEST_ID",
    "SIGNATURE",
    "SIGNED_HEADERS",
    "TENANT",
    "TRACEPARENT",
    "UNSIGNED_INGRESS",
    "Headers",
    "header_dict",
]

EVENT_TYPE: Final = "strata-event-type"
EVENT_ID: Final = "strata-event-id"
REQUEST_ID: Final = "strata-request-id"
DOC_ID: Final = "strata-doc-id"
TENANT: Final = "strata-tenant"
PRODUCER: Final = "strata-producer"
SIGNATURE: Final = "strata-signature"
DEADLINE: Final = "strata-deadline"
ATTEMPT: Final = "strata-attempt"
NEXT: Final = "strata-next"
TRACEPARENT: Final = "traceparent"
REPLAY: Final = "strata-replay"
# Set on every event derived, however indirectly, from an ingress event that was accepted
# without a signature (development option `security.allow_unsigned_ingress`).
UNSIGNED_INGRESS: Final = "strata-unsigned-ingress"

# Dead-letter headers, after Spring Kafka's DeadLetterPublishingRecoverer.
DLT_PREFIX: Final = "strata-dlt-"
DLT_ORIGINAL_TOPIC: Final = "strata-dlt-original-topic"
DLT_ORIGINAL_PARTITION: Final = "strata-dlt-original-partition"
DLT_ORIGINAL_OFFSET: Final = "strata-dlt-original-offset"
DLT_ORIGINAL_TIMESTAMP: Final = "strata-dlt-original-timestamp"
DLT_ORIGINAL_CONSUMER_GROUP: Final = "strata-dlt-original-consumer-group"
DLT_EXCEPTION_FQCN: Final = "strata-dlt-exception-fqcn"
DLT_EXCEPTION_MESSAGE: Final = "strata-dlt-exception-message"
DLT_EXCEPTION_STACKTRACE: Final = "strata-dlt-exception-stacktrace"
DLT_FAILURE_CLASS: Final = "strata-dlt-failure-class"
DLT_SERVICE: Final = "strata-dlt-service"

# The headers covered by the producer's signature, in signing order.  `strata-attempt`,
# `strata-replay` and the DLT headers are added by infrastructure after signing and are
# deliberately outside it, so redrive and replay keep the original signature valid.
SIGNED_HEADERS: Final[tuple[str, ...]] = (
    EVENT_TYPE,
    EVENT_ID,
    REQUEST_ID,
    DOC_ID,
    TENANT,
    PRODUCER,
    DEADLINE,
    NEXT,
    TRACEPARENT,
    UNSIGNED_INGRESS,
)

Headers = list[tuple[str, bytes]]


def header_dict(headers: Iterable[tuple[str, bytes]] | None) -> dict[str, bytes]:
    """Headers as a dict; the last value of a repeated header wins."""
    return dict(headers or ())
