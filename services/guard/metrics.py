"""Prometheus metrics of guard (``strata_guard_*``): verdicts and PII counts by category.

Labels are scanner, verdict, stage and entity category only: never a tenant-supplied string,
never matched text.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import Metric
from prometheus_client.registry import Collector

from stratamesh.obs.metrics import REGISTRY, Counter, Histogram

__all__ = ["GuardMetrics", "guard_metrics"]

_SCORE_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)


class GuardMetrics(Collector):
    def __init__(self) -> None:
        self.verdicts = Counter(
            "strata_guard_verdicts", "scanner verdicts", ["stage", "scanner", "verdict"]
        )
        self.results = Counter("strata_guard_results", "requests decided", ["stage", "outcome"])
        self.pii = Counter(
            "strata_guard_pii_entities", "entities pseudonymised", ["stage", "category"]
        )
        self.injection_score = Histogram(
            "strata_guard_injection_score",
            "injection score of admitted and blocked requests",
            [],
            _SCORE_BUCKETS,
        )

    def collect(self) -> Iterator[Metric]:
        for family in (self.verdicts, self.results, self.pii, self.injection_score):
            yield family.collect()

    def describe(self) -> Iterator[Metric]:
        return self.collect()


_registries: dict[int, GuardMetrics] = {}


def guard_metrics(registry: CollectorRegistry = REGISTRY) -> GuardMetrics:
    found = _registries.get(id(registry))
    if found is None:
        found = _registries[id(registry)] = GuardMetrics()
        registry.register(found)
    return found
