"""Prometheus metrics of consensus (``strata_consensus_*``).

Labels are mode, outcome, reason and replica identity only (bounded sets): never a tenant
string or answer text.
"""

from __future__ import annotations

from typing import Final

from prometheus_client import CollectorRegistry

from stratamesh.obs.metrics import REGISTRY, Counter, Histogram, MetricGroup, metric_group

__all__ = ["OUTCOMES", "ConsensusMetrics", "consensus_metrics"]

OUTCOMES: Final = "strata_consensus_outcomes"

_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ConsensusMetrics(MetricGroup):
    def __init__(self) -> None:
        # outcome: decided | escalated | fallback
        self.outcomes = Counter(OUTCOMES, "requests decided or escalated", ["mode", "outcome"])
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
            "first candidate to outcome, seconds",
            ["mode", "outcome"],
            _SECONDS,
        )


def consensus_metrics(registry: CollectorRegistry = REGISTRY) -> ConsensusMetrics:
    return metric_group(ConsensusMetrics, registry)


# Registered at import, like module-level prometheus_client metrics: /metrics lists every
# family of the services a process loaded from the start.
consensus_metrics()
