"""Optional OpenTelemetry export: one consumer span per handled record.

Trace context already travels in every record's ``traceparent`` header (DESIGN.md §2); this
module only *exports* it.  With ``Settings.obs.otel_endpoint`` set
(``STRATA_OBS__OTEL_ENDPOINT``), each record that reaches a handler becomes a span

- of kind CONSUMER named ``process <topic>``, child of the record's ``traceparent``
  (same trace id, parent = the producer's span id), or a new root when it has none;
- with attributes ``strata.service``, ``messaging.destination.name`` (topic),
  ``strata.event_type``, ``strata.tenant``, ``strata.event_id``, ``strata.request_id`` /
  ``strata.doc_id``, and on end ``strata.outcome`` (ok, expired, dlq_<class>) and
  ``strata.attempts`` — identifiers only, never payload text;
- exported over OTLP/HTTP by a batch processor (a background thread; the event loop only
  queues finished spans).

The events the handler publishes carry this span's id as their ``traceparent`` parent, so a
request's spans form one tree across services.

Unset endpoint: :func:`handler_tracer` returns None, the middleware checks one attribute per
record, and nothing imports ``opentelemetry`` (an optional extra: ``pip install
stratamesh[otel]``).
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

from stratamesh.config import Settings
from stratamesh.errors import ConfigError
from stratamesh.obs.tracing import TraceContext

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter

__all__ = ["HandlerSpan", "HandlerTracer", "handler_tracer"]

_providers: dict[tuple[str, str], TracerProvider] = {}
_lock = threading.Lock()


class HandlerSpan:
    """The span of one record's handling (start → :meth:`end`)."""

    __slots__ = ("_span", "trace")

    def __init__(self, span: Any, trace: TraceContext) -> None:
        self._span = span
        self.trace = trace  # what the handler's outputs carry as `traceparent`

    def end(self, outcome: str, attempts: int) -> None:
        self._span.set_attribute("strata.outcome", outcome)
        self._span.set_attribute("strata.attempts", attempts)
        if outcome.startswith("dlq_"):
            from opentelemetry.trace import Status, StatusCode

            self._span.set_status(Status(StatusCode.ERROR, outcome))
        self._span.end()


class HandlerTracer:
    """Starts the consumer spans of one service identity."""

    def __init__(self, provider: TracerProvider, service: str) -> None:
        self.provider = provider
        self.service = service
        self._tracer = provider.get_tracer("stratamesh.bus")

    def start(
        self,
        *,
        topic: str,
        event_type: str | None,
        event_id: str | None,
        tenant: str | None,
        request_id: str | None,
        doc_id: str | None,
        parent: TraceContext | None,
    ) -> HandlerSpan:
        from opentelemetry import trace

        context = None
        if parent is not None:
            remote = trace.SpanContext(
                trace_id=int(parent.trace_id, 16),
                span_id=int(parent.span_id, 16),
                is_remote=True,
                trace_flags=trace.TraceFlags(int(parent.flags, 16)),
            )
            context = trace.set_span_in_context(trace.NonRecordingSpan(remote))
        attributes: dict[str, str] = {
            "strata.service": self.service,
            "messaging.system": "kafka",
            "messaging.operation.type": "process",
            "messaging.destination.name": topic,
        }
        for key, value in (
            ("strata.event_type", event_type),
            ("strata.event_id", event_id),
            ("strata.tenant", tenant),
            ("strata.request_id", request_id),
            ("strata.doc_id", doc_id),
        ):
            if value:
                attributes[key] = value
        span = self._tracer.start_span(
            f"process {topic}",
            context=context,
            kind=trace.SpanKind.CONSUMER,
            attributes=attributes,
        )
        sc = span.get_span_context()
        flags = f"{int(sc.trace_flags):02x}"
        return HandlerSpan(span, TraceContext(f"{sc.trace_id:032x}", f"{sc.span_id:016x}", flags))

    def flush(self, timeout_s: float = 5.0) -> None:
        """Export what is queued (on service stop: a span must not die with the process)."""
        self.provider.force_flush(int(timeout_s * 1000))


def handler_tracer(
    settings: Settings, service: str, *, exporter: SpanExporter | None = None
) -> HandlerTracer | None:
    """The tracer of ``service``, or None when export is not configured.

    ``exporter`` replaces the OTLP/HTTP exporter (and is used even without an endpoint):
    the SDK's in-memory exporter in tests, or any other SDK exporter.
    """
    endpoint = settings.obs.otel_endpoint
    if not endpoint and exporter is None:
        return None
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
    except ImportError as exc:  # pragma: no cover - depends on the installed extras
        raise ConfigError(
            "STRATA_OBS__OTEL_ENDPOINT is set but OpenTelemetry is not installed: "
            "pip install 'stratamesh[otel]'"
        ) from exc
    name = f"{settings.obs.otel_service_prefix}.{service}"
    if exporter is not None:
        # Synchronous: a test reads the exporter right after the handler ran.
        provider = TracerProvider(resource=Resource.create({"service.name": name}))
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        return HandlerTracer(provider, service)
    assert endpoint is not None
    with _lock:
        # One provider (one exporter thread) per service identity and endpoint, however
        # often the service is started in this process.
        shared = _providers.get((endpoint, name))
        if shared is None:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            shared = TracerProvider(resource=Resource.create({"service.name": name}))
            shared.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
            _providers[(endpoint, name)] = shared
    return HandlerTracer(shared, service)
