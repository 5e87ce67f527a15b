"""Prometheus metrics of guard (``strata_guard_*``): verdicts and PII counts by category.

Labels are scanner, verdict, stage and entity category only: never a tenant-supplied string,
never matched text.
"""

from __future__ import annotations

from typing import Final

from prometheus_client import CollectorRegistry

from stratamesh.obs.metrics import REGISTRY, Counter, Histogram, MetricGroup, metric_group

__all__ = ["RESULTS", "VERDICTS", "GuardMetrics", "guard_metrics"]

VERDICTS: Final = "strata_guard_verdicts"
RESULTS: Final = "strata_guard_results"

_SCORE_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)


class GuardMetrics(MetricGroup):
    def __init__(self) -> None:
        self.verdicts = Counter(VERDICTS, "scanner verdicts", ["stage", "scanner", "verdict"])
        # stage: guard_in | guard_out | review; outcome: a CompletionStatus, admitted, or
        # duplicate_decision (a second review decision)
        self.results = Counter(RESULTS, "requests decided by guard", ["stage", "outcome"])
        self.pii = Counter(
            "strata_guard_pii_entities", "entities pseudonymised", ["stage", "category"]
        )
        self.injection_score = Histogram(
            "strata_guard_injection_score",
            "injection score of admitted and blocked requests",
            [],
            _SCORE_BUCKETS,
        )


def guard_metrics(registry: CollectorRegistry = REGISTRY) -> GuardMetrics:
    return metric_group(GuardMetrics, registry)


# Registered at import, like module-level prometheus_client metrics: /metrics lists every
# family of the services a process loaded from the start.
guard_metrics()
