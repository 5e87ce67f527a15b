"""W3C trace context (`traceparent`) propagation: parse, continue, start."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

__all__ = ["TraceContext"]

_TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")


@dataclass(frozen=True, slots=True)
class TraceContext:
    trace_id: str
    span_id: str
    flags: str = "01"

    @classmethod
    def new(cls) -> TraceContext:
        return cls(os.urandom(16).hex(), os.urandom(8).hex())

    @classmethod
    def parse(cls, header: bytes | str | None) -> TraceContext | None:
        """The context in a `traceparent` header, or None when absent or malformed."""
        if header is None:
            return None
        text = header.decode("ascii", "replace") if isinstance(header, bytes) else header
        m = _TRACEPARENT.match(text.strip())
        if not m or m.group(1) == "0" * 32 or m.group(2) == "0" * 16:
            return None
        return cls(m.group(1), m.group(2), m.group(3))

    def child(self) -> TraceContext:
        """A new span in the same trace, for an event produced while handling this one."""
        return TraceContext(self.trace_id, os.urandom(8).hex(), self.flags)

    @property
    def header(self) -> bytes:
        return f"00-{self.trace_id}-{self.span_id}-{self.flags}".encode()
