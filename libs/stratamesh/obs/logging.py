"""structlog set-up: JSON lines with service, event, request/doc id, trace id and tenant.

Context is bound per record with :func:`bind_record` (contextvars), so every line a handler
logs carries it without passing a logger around.  Values that may hold prompts, answers or
PII are never bound here; services log ids, never payloads.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from contextvars import ContextVar
from typing import Any

import structlog

__all__ = ["bind_record", "configure_logging", "get_logger"]


# The identifiers of the record being handled: one contextvar holding one dict, set once per
# record (structlog's per-key contextvars cost a few µs per record on the hot path).
_RECORD: ContextVar[dict[str, str] | None] = ContextVar("strata_record", default=None)


def _merge_record(
    _: Any, __: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    record = _RECORD.get()
    if record:
        for k, v in record.items():
            event_dict.setdefault(k, v)
    return event_dict


def configure_logging(
    level: str = "INFO", *, json: bool = True, service: str | None = None
) -> None:
    processors: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        _merge_record,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
        structlog.processors.format_exc_info,
    ]
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer()
    )
    structlog.configure(
        processors=[*processors, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
        ),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
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
