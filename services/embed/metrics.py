"""Prometheus metrics of the embed service (``strata_embed_*``), labelled by model stamp."""

from __future__ import annotations

from typing import Final

from prometheus_client import CollectorRegistry

from stratamesh.obs.metrics import REGISTRY, Counter, Histogram, MetricGroup, metric_group

__all__ = ["CACHE_HITS", "MODEL_TEXTS", "EmbedMetrics", "embed_metrics"]

CACHE_HITS: Final = "strata_embed_cache_hits"
MODEL_TEXTS: Final = "strata_embed_model_texts"

_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class EmbedMetrics(MetricGroup):
    def __init__(self) -> None:
        self.model_calls = Counter("strata_embed_model_calls", "embedding model calls", ["model"])
        self.model_texts = Counter(MODEL_TEXTS, "texts sent to the embedding model", ["model"])
        self.cache_hits = Counter(
            CACHE_HITS, "texts whose embedding came from the cache", ["model"]
        )
        self.model_seconds = Histogram(
            "strata_embed_model_seconds",
            "time per embedding call (waiting for a model busy with another lane included)",
            ["model"],
        )
        self.batch_texts = Histogram(
            "strata_embed_batch_texts", "texts per model call", ["model"], _BATCH_BUCKETS
        )


def embed_metrics(registry: CollectorRegistry = REGISTRY) -> EmbedMetrics:
    """The one :class:`EmbedMetrics` of ``registry`` (created and registered on first use)."""
    return metric_group(EmbedMetrics, registry)


# Registered at import, like module-level prometheus_client metrics: /metrics lists every
# family of the services a process loaded from the start.
embed_metrics()
