"""Prometheus metrics of the embed service (``strata_embed_*``), labelled by model stamp."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import Metric
from prometheus_client.registry import Collector

from stratamesh.obs.metrics import REGISTRY, Counter, Histogram

__all__ = ["EmbedMetrics", "embed_metrics"]

_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class EmbedMetrics(Collector):
    def __init__(self) -> None:
        self.model_calls = Counter("strata_embed_model_calls", "embedding model calls", ["model"])
        self.model_texts = Counter(
            "strata_embed_model_texts", "texts sent to the embedding model", ["model"]
        )
        self.cache_hits = Counter(
            "strata_embed_cache_hits", "texts whose embedding came from the cache", ["model"]
        )
        self.model_seconds = Histogram(
            "strata_embed_model_seconds",
            "time per embedding call (waiting for a model busy with another lane included)",
            ["model"],
        )
        self.batch_texts = Histogram(
            "strata_embed_batch_texts", "texts per model call", ["model"], _BATCH_BUCKETS
        )

    def collect(self) -> Iterator[Metric]:
        for family in (
            self.model_calls,
            self.model_texts,
            self.cache_hits,
            self.model_seconds,
            self.batch_texts,
        ):
            yield family.collect()

    def describe(self) -> Iterator[Metric]:
        return self.collect()


_registries: dict[int, EmbedMetrics] = {}


def embed_metrics(registry: CollectorRegistry = REGISTRY) -> EmbedMetrics:
    """The one :class:`EmbedMetrics` of ``registry`` (created and registered on first use)."""
    found = _registries.get(id(registry))
    if found is None:
        found = _registries[id(registry)] = EmbedMetrics()
        registry.register(found)
    return found
