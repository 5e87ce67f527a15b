"""Prometheus metrics of route (``strata_route_*``): cache lookups, refusals, decisions.

Labels are bounded sets chosen by route's code (cache kind, outcome, lane, tier, policy
rule): never a tenant string or prompt text.
"""

from __future__ import annotations

from typing import Final

from prometheus_client import CollectorRegistry

from stratamesh.obs.metrics import REGISTRY, Counter, MetricGroup, metric_group

__all__ = ["CACHE_LOOKUPS", "REFUSALS", "SHED", "RouteMetrics", "route_metrics"]

CACHE_LOOKUPS: Final = "strata_route_cache_lookups"
SHED: Final = "strata_route_shed"
REFUSALS: Final = "strata_route_refusals"


class RouteMetrics(MetricGroup):
    def __init__(self) -> None:
        self.cache_lookups = Counter(
            CACHE_LOOKUPS,
            "route cache lookups by kind (exact, semantic) and outcome (hit, miss)",
            ["kind", "outcome"],
        )
        self.cache_fills = Counter(
            "strata_route_cache_fills",
            "results considered for the cache, by outcome (stored, stale_or_not_pending, skipped)",
            ["outcome"],
        )
        self.invalidated = Counter(
            "strata_route_cache_invalidated",
            "cached answers dropped because a document they cited got a newer version",
            [],
        )
        self.shed = Counter(SHED, "requests refused as overloaded, by lane", ["lane"])
        self.refused = Counter(
            REFUSALS,
            "requests refused over a tenant limit, by kind (rate_limit, cost_budget)",
            ["kind"],
        )
        self.routed = Counter(
            "strata_route_decisions", "requests routed, by tier and policy rule", ["tier", "rule"]
        )
        self.downgrades = Counter(
            "strata_route_policy_downgrades",
            "policy asks the deployment cannot serve (stage, adapter) or the lane caps (tier)",
            ["what"],
        )


def route_metrics(registry: CollectorRegistry = REGISTRY) -> RouteMetrics:
    return metric_group(RouteMetrics, registry)


# Registered at import, like module-level prometheus_client metrics: /metrics lists every
# family of the services a process loaded from the start.
route_metrics()
