"""W3C trace context (`traceparent`) propagation: parse, continue, start."""

from __future__ import annotations

import os
import random
import re
from dataclasses import dataclass

__all__ = ["TraceContext", "new_traceparent"]

_rng = random.Random(int.from_bytes(os.urandom(16), "big"))
_TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")


@dataclass(frozen=True, slots=True)
class TraceContext:
    trace_id: str
    span_id: str
    flags: str = "01"

    @classmethod
    def new(cls) -> TraceContext:
        # Trace ids need to be unique, not secret: a PRNG draw costs far less than urandom.
        return cls(f"{_rng.getrandbits(128) or 1:032x}", f"{_rng.getrandbits(64) or 1:016x}")

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
        return TraceContext(self.trace_id, f"{_rng.getrandbits(64) or 1:016x}", self.flags)

    @property
    def header(self) -> bytes:
        return f"00-{self.trace_id}-{self.span_id}-{self.flags}".encode()


def new_traceparent() -> bytes:
    """``TraceContext.new().header`` without the intermediate object (every ingress event
    starts a trace)."""
    return f"00-{_rng.getrandbits(128) or 1:032x}-{_rng.getrandbits(64) or 1:016x}-01".encode()
