"""Observability: structured logs, Prometheus metrics, trace-context propagation."""

from stratamesh.obs.logging import bind_record, configure_logging, get_logger
from stratamesh.obs.metrics import REGISTRY, BusMetrics, bus_metrics, serve_metrics
from stratamesh.obs.tracing import TraceContext

__all__ = [
    "REGISTRY",
    "BusMetrics",
    "TraceContext",
    "bind_record",
    "bus_metrics",
    "configure_logging",
    "get_logger",
    "serve_metrics",
]
