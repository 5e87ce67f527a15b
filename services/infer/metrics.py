"""Prometheus metrics of infer (``strata_infer_*``): tokens and cost by tenant and model,
answers by degradation tier, time to first token.

``tenant`` is the authenticated tenant of the envelope (a configured, bounded set), never a
payload field; model ids are ``model@revision`` of configured backends.
"""

from __future__ import annotations

from typing import Final

from prometheus_client import CollectorRegistry

from stratamesh.obs.metrics import REGISTRY, Counter, Histogram, MetricGroup, metric_group

__all__ = ["ANSWERS", "COST_USD", "TOKENS", "TTFT_SECONDS", "InferMetrics", "infer_metrics"]

TOKENS: Final = "strata_infer_tokens"
COST_USD: Final = "strata_infer_cost_usd"
ANSWERS: Final = "strata_infer_answers"
TTFT_SECONDS: Final = "strata_infer_ttft_seconds"

_TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class InferMetrics(MetricGroup):
    def __init__(self) -> None:
        # direction: in (prompt) | out (completion)
        self.tokens = Counter(
            TOKENS, "model tokens, by tenant and model", ["tenant", "model", "direction"]
        )
        self.cost_usd = Counter(
            COST_USD, "model cost, USD, by tenant and model", ["tenant", "model"]
        )
        # tier: the degradation tier that answered (full, reduced, extractive, expired)
        self.answers = Counter(ANSWERS, "answers by degradation tier", ["replica", "tier"])
        self.ttft_seconds = Histogram(
            TTFT_SECONDS,
            "time to first token of the model call that answered, seconds",
            ["backend"],
            _TTFT_BUCKETS,
        )


def infer_metrics(registry: CollectorRegistry = REGISTRY) -> InferMetrics:
    return metric_group(InferMetrics, registry)


# Registered at import, like module-level prometheus_client metrics: /metrics lists every
# family of the services a process loaded from the start.
infer_metrics()
