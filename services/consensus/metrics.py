"""Prometheus metrics of consensus (``strata_consensus_*``).

Labels are mode, outcome, reason and replica identity only (bounded sets): never a tenant
string or answer text.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import Metric
from prometheus_client.registry import Collector

from stratamesh.obs.metrics import REGISTRY, Counter, Histogram

__all__ = ["ConsensusMetrics", "consensus_metrics"]

_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ConsensusMetrics(Collector):
    def __init__(self) -> None:
        # outcome: decided | escalated | fallback
        self.outcomes = Counter(
            "strata_consensus_outcomes", "requests decided or escalated", ["mode", "outcome"]
        )
        self.rejected = Counter(
            "strata_consensus_rejected",
            "candidates not counted, by reason (forged, unknown, duplicate, ...)",
            ["reason", "replica"],
        )
        self.late = Counter(
            "strata_consensus_late", "candidates arriving after their request's outcome", []
        )
        self.seconds = Histogram(
            "strata_consensus_decision_seconds",
            "first candidate to outcome",
            ["mode", "outcome"],
            _SECONDS,
        )

    def collect(self) -> Iterator[Metric]:
        for family in (self.outcomes, self.rejected, self.late, self.seconds):
            yield family.collect()

    def describe(self) -> Iterator[Metric]:
        return self.collect()


_registries: dict[int, ConsensusMetrics] = {}


def consensus_metrics(registry: CollectorRegistry = REGISTRY) -> ConsensusMetrics:
    found = _registries.get(id(registry))
    if found is None:
        found = _registries[id(registry)] = ConsensusMetrics()
        registry.register(found)
    return found
