"""Prometheus metrics shared by every service (prefix ``strata_``, DESIGN.md §6).

Names and labels are fixed here so dashboards and alerts can rely on them.  Each process
has one registry; `strata up` runs every service in one process and serves it once.

The bus records several metrics per message, so they are plain Python numbers updated
without locks (the services run on one event loop) and turned into Prometheus samples only
when scraped: ``prometheus_client``'s own metric objects take a mutex per update, which
cost more than the rest of the middleware's bookkeeping together.  The API is the same
subset: ``labels(...)``, then ``inc``, ``set`` or ``observe``; ``remove(...)``.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterator, Sequence

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

__all__ = ["REGISTRY", "BusMetrics", "bus_metrics", "serve_metrics"]

REGISTRY = CollectorRegistry(auto_describe=True)

LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)

Labels = tuple[str, ...]


class _Family:
    kind = ""

    def __init__(self, name: str, doc: str, labelnames: Sequence[str]) -> None:
        self.name, self.doc, self.labelnames = name, doc, list(labelnames)

    def collect(self) -> Metric:
        raise NotImplementedError

    def _key(self, values: Sequence[str]) -> Labels:
        if len(values) != len(self.labelnames):
            raise ValueError(f"{self.name} takes labels {self.labelnames}, got {values!r}")
        return tuple(str(v) for v in values)


class _CounterChild:
    __slots__ = ("_key", "_values")

    def __init__(self, values: dict[Labels, float], key: Labels) -> None:
        self._values, self._key = values, key
        values.setdefault(key, 0.0)

    def inc(self, amount: float = 1.0) -> None:
        if amount < 0:
            raise ValueError("counters only go up")
        self._values[self._key] += amount


class Counter(_Family):
    def __init__(self, name: str, doc: str, labelnames: Sequence[str]) -> None:
        super().__init__(name, doc, labelnames)
        self.values: dict[Labels, float] = {}

    def labels(self, *values: str) -> _CounterChild:
        return _CounterChild(self.values, self._key(values))

    def collect(self) -> Metric:
        family = CounterMetricFamily(self.name, self.doc, labels=self.labelnames)
        for key, value in dict(self.values).items():
            family.add_metric(list(key), value)
        return family


class _GaugeChild:
    __slots__ = ("_key", "_values")

    def __init__(self, values: dict[Labels, float], key: Labels) -> None:
        self._values, self._key = values, key
        values.setdefault(key, 0.0)

    def set(self, value: float) -> None:
        self._values[self._key] = value


class Gauge(_Family):
    def __init__(self, name: str, doc: str, labelnames: Sequence[str]) -> None:
        super().__init__(name, doc, labelnames)
        self.values: dict[Labels, float] = {}

    def labels(self, *values: str) -> _GaugeChild:
        return _GaugeChild(self.values, self._key(values))

    def remove(self, *values: str) -> None:
        self.values.pop(self._key(values), None)

    def collect(self) -> Metric:
        family = GaugeMetricFamily(self.name, self.doc, labels=self.labelnames)
        for key, value in dict(self.values).items():
            family.add_metric(list(key), value)
        return family


class _HistogramChild:
    __slots__ = ("_bounds", "_counts", "_key", "_sums")

    def __init__(self, h: Histogram, key: Labels) -> None:
        self._bounds, self._key = h.bounds, key
        self._counts = h.counts.setdefault(key, [0] * (len(h.bounds) + 1))
        self._sums = h.sums
        self._sums.setdefault(key, 0.0)

    def observe(self, value: float) -> None:
        self._counts[bisect.bisect_left(self._bounds, value)] += 1
        self._sums[self._key] += value


class Histogram(_Family):
    def __init__(
        self,
        name: str,
        doc: str,
        labelnames: Sequence[str],
        buckets: Sequence[float] = LATENCY_BUCKETS,
    ) -> None:
        super().__init__(name, doc, labelnames)
        self.bounds = list(buckets)
        self.counts: dict[Labels, list[int]] = {}
        self.sums: dict[Labels, float] = {}

    def labels(self, *values: str) -> _HistogramChild:
        return _HistogramChild(self, self._key(values))

    def collect(self) -> Metric:
        family = HistogramMetricFamily(self.name, self.doc, labels=self.labelnames)
        for key, counts in dict(self.counts).items():
            running, buckets = 0, []
            for bound, n in zip([*self.bounds, math.inf], counts, strict=True):
                running += n
                buckets.append(("+Inf" if bound == math.inf else repr(bound), running))
            family.add_metric(list(key), buckets, self.sums.get(key, 0.0))
        return family


class BusMetrics(Collector):
    """The consumer/producer metrics of the bus (one instance per registry)."""

    def __init__(self) -> None:
        self.consumed = Counter(
            "strata_messages_consumed", "records received by a service", ["service", "topic"]
        )
        self.produced = Counter(
            "strata_messages_produced", "records acknowledged by the broker", ["service", "topic"]
        )
        self.handled = Counter(
            "strata_messages_handled", "records by outcome", ["service", "topic", "outcome"]
        )
        self.handler_seconds = Histogram(
            "strata_handler_seconds", "handler latency", ["service", "topic"]
        )
        self.retries = Counter("strata_retries", "handler retries", ["service", "topic"])
        self.dlq = Counter(
            "strata_dlq_messages",
            "records sent to a dead-letter topic",
            ["service", "topic", "failure_class"],
        )
        self.duplicates = Counter(
            "strata_duplicates_skipped",
            "redelivered records skipped by idempotency",
            ["service", "topic"],
        )
        self.lag = Gauge(
            "strata_consumer_lag",
            "records behind the end of the partition",
            ["service", "group", "topic", "partition"],
        )
        self.retry_budget_exhausted = Counter(
            "strata_retry_budget_exhausted",
            "failures not retried because the retry budget was empty",
            ["service"],
        )

    def _families(self) -> list[_Family]:
        return [v for v in vars(self).values() if isinstance(v, _Family)]

    def collect(self) -> Iterator[Metric]:
        for family in self._families():
            yield family.collect()

    def describe(self) -> Iterator[Metric]:
        for family in self._families():
            yield family.collect()


_registries: dict[int, BusMetrics] = {}


def bus_metrics(registry: CollectorRegistry = REGISTRY) -> BusMetrics:
    """The one :class:`BusMetrics` of ``registry`` (created and registered on first use)."""
    found = _registries.get(id(registry))
    if found is None:
        found = _registries[id(registry)] = BusMetrics()
        registry.register(found)
    return found


def serve_metrics(port: int, registry: CollectorRegistry = REGISTRY, addr: str = "0.0.0.0") -> None:
    """Serve ``/metrics`` on ``port`` from a background thread."""
    start_http_server(port, addr=addr, registry=registry)
