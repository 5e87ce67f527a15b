"""The verified envelope of a consumed record, and the headers of a produced one."""

from __future__ import annotations

import time
from dataclasses import dataclass

from stratamesh.bus import headers as H
from stratamesh.obs.tracing import TraceContext

__all__ = ["Envelope", "now_ms"]


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def _int(raw: bytes) -> int | None:
    try:
        return int(raw)
    except ValueError:
        return None


@dataclass(slots=True)  # not frozen: frozen __init__ costs µs on the per-record path
class Envelope:
    """What the headers of a record say, after the signature and producer were checked.

    ``tenant`` is authoritative: for a client's ingress event it is the tenant bound to the
    client's key, whatever the header or payload claimed.
    """

    event_type: str | None
    event_id: str | None
    request_id: str | None
    doc_id: str | None
    tenant: str | None
    producer: str | None
    deadline_ms: int | None
    next_stage: str | None
    traceparent: bytes | None
    attempt: int
    replay: bytes | None
    unsigned_ingress: bool
    client: str | None = None

    @classmethod
    def parse(cls, headers: dict[str, bytes]) -> Envelope:
        # Inlined rather than a helper call per header: this runs for every record consumed.
        get = headers.get
        event_type, event_id = get(H.EVENT_TYPE), get(H.EVENT_ID)
        request_id, doc_id = get(H.REQUEST_ID), get(H.DOC_ID)
        tenant, producer, next_stage = get(H.TENANT), get(H.PRODUCER), get(H.NEXT)
        deadline, attempt = get(H.DEADLINE), get(H.ATTEMPT)
        return cls(
            None if event_type is None else event_type.decode("utf-8", "replace"),
            None if event_id is None else event_id.decode("utf-8", "replace"),
            None if request_id is None else request_id.decode("utf-8", "replace"),
            None if doc_id is None else doc_id.decode("utf-8", "replace"),
            None if tenant is None else tenant.decode("utf-8", "replace"),
            None if producer is None else producer.decode("utf-8", "replace"),
            None if deadline is None else _int(deadline),
            None if next_stage is None else next_stage.decode("utf-8", "replace"),
            get(H.TRACEPARENT),
            1 if attempt is None else (_int(attempt) or 1),
            get(H.REPLAY),
            get(H.UNSIGNED_INGRESS) == b"1",
        )

    @property
    def trace_id(self) -> str | None:
        """The trace id alone, cheaply (every log line carries it; no full parse)."""
        tp = self.traceparent
        if tp is None or len(tp) != 55 or tp[2:3] != b"-":
            return None
        return tp[3:35].decode("ascii", "replace")

    @property
    def trace(self) -> TraceContext | None:
        """The W3C trace context of the record (parsed on first use; None if malformed)."""
        return TraceContext.parse(self.traceparent)

    def expired(self, at_ms: int | None = None) -> bool:
        return self.deadline_ms is not None and (at_ms or now_ms()) > self.deadline_ms
