"""The verified envelope of a consumed record, and the headers of a produced one."""

from __future__ import annotations

import time
from dataclasses import dataclass

from stratamesh.bus import headers as H
from stratamesh.obs.tracing import TraceContext

__all__ = ["Envelope", "now_ms"]


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def _text(raw: bytes | None) -> str | None:
    return raw.decode("utf-8", "replace") if raw is not None else None


def _int(raw: bytes | None) -> int | None:
    if raw is None:
        return None
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
        return cls(
            event_type=_text(headers.get(H.EVENT_TYPE)),
            event_id=_text(headers.get(H.EVENT_ID)),
            request_id=_text(headers.get(H.REQUEST_ID)),
            doc_id=_text(headers.get(H.DOC_ID)),
            tenant=_text(headers.get(H.TENANT)),
            producer=_text(headers.get(H.PRODUCER)),
            deadline_ms=_int(headers.get(H.DEADLINE)),
            next_stage=_text(headers.get(H.NEXT)),
            traceparent=headers.get(H.TRACEPARENT),
            attempt=_int(headers.get(H.ATTEMPT)) or 1,
            replay=headers.get(H.REPLAY),
            unsigned_ingress=headers.get(H.UNSIGNED_INGRESS) == b"1",
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
