"""structlog set-up: JSON lines with service, event, request/doc id, trace id and tenant.

Context is bound per record with :func:`bind_record` (contextvars), so every line a handler
logs carries it without passing a logger around.  Values that may hold prompts, answers or
PII are never bound here; services log ids, never payloads (tests/integration/
test_log_privacy.py runs the request plane at DEBUG with PII in the prompts to prove it).

Every line has the same keys — ``service``, ``event``, ``request_id`` (or ``doc_id``),
``trace_id``, ``tenant`` — null when a line is about no record (start-up, rebalances), so a
log pipeline can index them without guessing.  Lines of libraries logging through the
standard library (aiokafka, httpx …) are rendered the same way, with the same context.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping, MutableMapping
from contextvars import ContextVar
from typing import Any, Protocol

import structlog

__all__ = ["LogFields", "bind_record", "bind_record_fields", "configure_logging", "get_logger"]


class LogFields(Protocol):
    """Something that knows a record's identifiers and renders them only when asked."""

    def log_fields(self) -> Mapping[str, str]: ...


# The identifiers of the record being handled: one contextvar, set once per record
# (structlog's per-key contextvars cost a few µs per record on the hot path).  It holds
# either the dict itself or a LogFields rendered only when a line is actually logged: most
# records are handled without one.
_RECORD: ContextVar[Mapping[str, str] | LogFields | None] = ContextVar(
    "strata_record", default=None
)


def _merge_record(
    _: Any, __: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    record = _RECORD.get()
    if record is not None:
        fields = record if isinstance(record, Mapping) else record.log_fields()
        for k, v in fields.items():
            event_dict.setdefault(k, v)
    return event_dict


def _ensure_keys(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key in ("service", "trace_id", "tenant"):
        event_dict.setdefault(key, None)
    if "request_id" not in event_dict and "doc_id" not in event_dict:
        event_dict["request_id"] = None
    return event_dict


class _StdlibHandler(logging.Handler):
    """The root handler configure_logging installs (replaced, not stacked, on reuse).

    Writes to whatever ``sys.stderr`` is at the time, like the structlog lines.
    """

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")
        except Exception:
            self.handleError(record)


def configure_logging(
    level: str = "INFO", *, json: bool = True, service: str | None = None
) -> None:
    processors: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        _merge_record,
        _ensure_keys,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
        structlog.processors.format_exc_info,
    ]
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer()
    )
    numeric = logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
    structlog.configure(
        processors=[*processors, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    # Libraries' stdlib records through the same chain, to the same stream.
    handler = _StdlibHandler()
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processor=renderer,
            foreign_pre_chain=[
                structlog.stdlib.add_logger_name,
                *processors,
                structlog.stdlib.ExtraAdder(),
            ],
        )
    )
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _StdlibHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    # Libraries' INFO (aiokafka's group chatter) is noise beside the mesh's own lines: they
    # speak from WARNING up, or at DEBUG when everything is asked for.
    libraries = numeric if numeric <= logging.DEBUG else max(numeric, logging.WARNING)
    root.setLevel(libraries)
    # aiokafka's DEBUG dumps whole protocol requests and responses, record values (prompts,
    # answers) included: never below INFO, whatever level the mesh logs at.
    logging.getLogger("aiokafka").setLevel(max(libraries, logging.INFO))
    if service:
        structlog.contextvars.bind_contextvars(service=service)


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    logger: structlog.stdlib.BoundLogger = structlog.get_logger(name)
    return logger


def bind_record(
    *,
    service: str,
    event_type: str | None,
    event_id: str | None,
    request_id: str | None,
    doc_id: str | None,
    trace_id: str | None,
    tenant: str | None,
    topic: str,
) -> None:
    """Bind one record's identifiers to the current context (replacing the previous record's)."""
    ctx = {
        "service": service,
        "event_type": event_type,
        "event_id": event_id,
        "request_id": request_id,
        "doc_id": doc_id,
        "trace_id": trace_id,
        "tenant": tenant,
        "topic": topic,
    }
    _RECORD.set({k: v for k, v in ctx.items() if v is not None})


def bind_record_fields(fields: LogFields) -> None:
    """:func:`bind_record`, rendered lazily from ``fields.log_fields()`` (None values left out
    by the renderer)."""
    _RECORD.set(fields)
