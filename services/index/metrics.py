"""Prometheus metrics of index (``strata_index_*``)."""

from __future__ import annotations

from typing import Final

from prometheus_client import CollectorRegistry

from stratamesh.obs.metrics import REGISTRY, Histogram, MetricGroup, metric_group

__all__ = ["LAG_SECONDS", "IndexMetrics", "index_metrics"]

LAG_SECONDS: Final = "strata_index_lag_seconds"

_LAG_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


class IndexMetrics(MetricGroup):
    def __init__(self) -> None:
        # DESIGN.md §4 "index_lag_seconds"; the alert on index lag > 120 s reads its p99.
        self.lag_seconds = Histogram(
            LAG_SECONDS,
            "from the document's event time to searchable in the live collection, seconds",
            [],
            _LAG_BUCKETS,
        )


def index_metrics(registry: CollectorRegistry = REGISTRY) -> IndexMetrics:
    return metric_group(IndexMetrics, registry)


# Registered at import, like module-level prometheus_client metrics: /metrics lists every
# family of the services a process loaded from the start.
index_metrics()
