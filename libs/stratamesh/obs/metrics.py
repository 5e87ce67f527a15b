"""Prometheus metrics shared by every service (prefix ``strata_``, DESIGN.md §6).

Names and labels are fixed here so dashboards and alerts can rely on them.  Each process
has one registry; `strata up` runs every service in one process and serves it once.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

__all__ = ["REGISTRY", "BusMetrics", "bus_metrics", "serve_metrics"]

REGISTRY = CollectorRegistry(auto_describe=True)

_LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)


class BusMetrics:
    """The consumer/producer metrics of the bus (one instance per registry)."""

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.consumed = Counter(
            "strata_messages_consumed",
            "records received by a service",
            ["service", "topic"],
            registry=registry,
        )
        self.produced = Counter(
            "strata_messages_produced",
            "records acknowledged by the broker",
            ["service", "topic"],
            registry=registry,
        )
        self.handled = Counter(
            "strata_messages_handled",
            "records by outcome",
            ["service", "topic", "outcome"],
            registry=registry,
        )
        self.handler_seconds = Histogram(
            "strata_handler_seconds",
            "handler latency",
            ["service", "topic"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.retries = Counter(
            "strata_retries", "handler retries", ["service", "topic"], registry=registry
        )
        self.dlq = Counter(
            "strata_dlq_messages",
            "records sent to a dead-letter topic",
            ["service", "topic", "failure_class"],
            registry=registry,
        )
        self.duplicates = Counter(
            "strata_duplicates_skipped",
            "redelivered records skipped by idempotency",
            ["service", "topic"],
            registry=registry,
        )
        self.lag = Gauge(
            "strata_consumer_lag",
            "records behind the end of the partition",
            ["service", "group", "topic", "partition"],
            registry=registry,
        )
        self.retry_budget_exhausted = Counter(
            "strata_retry_budget_exhausted",
            "failures not retried because the budget was empty",
            ["service"],
            registry=registry,
        )


_registries: dict[int, BusMetrics] = {}


def bus_metrics(registry: CollectorRegistry = REGISTRY) -> BusMetrics:
    """The one :class:`BusMetrics` of ``registry`` (created on first use)."""
    found = _registries.get(id(registry))
    if found is None:
        found = _registries[id(registry)] = BusMetrics(registry)
    return found


def serve_metrics(port: int, registry: CollectorRegistry = REGISTRY, addr: str = "0.0.0.0") -> None:
    """Serve ``/metrics`` on ``port`` from a background thread."""
    start_http_server(port, addr=addr, registry=registry)
