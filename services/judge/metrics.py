"""Prometheus metrics of judge (``strata_judge_*``): scores by kind, outcomes."""

from __future__ import annotations

from typing import Final

from prometheus_client import CollectorRegistry

from stratamesh.obs.metrics import REGISTRY, Counter, Histogram, MetricGroup, metric_group

__all__ = ["OUTCOMES", "SCORE", "JudgeMetrics", "judge_metrics"]

SCORE: Final = "strata_judge_score"
OUTCOMES: Final = "strata_judge_outcomes"

_SCORE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


class JudgeMetrics(MetricGroup):
    def __init__(self) -> None:
        # kind: faithfulness, relevance, citations, format, rubric (the AnswerJudged scores)
        self.scores = Histogram(SCORE, "judge scores by kind", ["kind"], _SCORE_BUCKETS)
        # outcome: passed | revise | failed (revision cap reached) | expired
        self.outcomes = Counter(OUTCOMES, "judged answers by outcome", ["outcome"])


def judge_metrics(registry: CollectorRegistry = REGISTRY) -> JudgeMetrics:
    return metric_group(JudgeMetrics, registry)


# Registered at import, like module-level prometheus_client metrics: /metrics lists every
# family of the services a process loaded from the start.
judge_metrics()
