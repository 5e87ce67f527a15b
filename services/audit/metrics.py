"""Prometheus metrics of audit (``strata_audit_*``): records, duplicates, appends, billing."""

from __future__ import annotations

from typing import Final

from prometheus_client import CollectorRegistry

from stratamesh.obs.metrics import REGISTRY, Counter, Histogram, MetricGroup, metric_group

__all__ = [
    "APPEND_FAILURES",
    "APPEND_SECONDS",
    "BILLED_USD",
    "DUPLICATES",
    "RECORDS",
    "AuditMetrics",
    "audit_metrics",
]

RECORDS: Final = "strata_audit_records"
DUPLICATES: Final = "strata_audit_duplicates"
APPEND_SECONDS: Final = "strata_audit_append_seconds"
APPEND_FAILURES: Final = "strata_audit_append_failures"
BILLED_USD: Final = "strata_audit_billed_usd"

_APPEND_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0)


class AuditMetrics(MetricGroup):
    def __init__(self) -> None:
        # status: ok | rejected (a record audit could not authenticate or decode)
        self.records = Counter(RECORDS, "audit records appended", ["topic", "status"])
        self.duplicates = Counter(
            DUPLICATES, "redelivered events the audit store already held", ["topic"]
        )
        self.append_seconds = Histogram(
            APPEND_SECONDS,
            "one batch append (chain, seal, transaction), seconds",
            [],
            _APPEND_BUCKETS,
        )
        # A growing count with a growing lag: the database refuses appends (they are retried).
        self.append_failures = Counter(APPEND_FAILURES, "failed batch appends (retried)", [])
        self.billed_usd = Counter(BILLED_USD, "cost booked in the ledger, USD", ["tenant", "model"])


def audit_metrics(registry: CollectorRegistry = REGISTRY) -> AuditMetrics:
    return metric_group(AuditMetrics, registry)


# Registered at import: /metrics lists every family of the services a process loaded.
audit_metrics()
