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
from typing import Final, TypeVar

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

__all__ = [
    "REGISTRY",
    "BusMetrics",
    "Counter",
    "Gauge",
    "Histogram",
    "MetricGroup",
    "ResultMetrics",
    "bus_metrics",
    "metric_group",
    "result_metrics",
    "serve_metrics",
]

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

    def inc(self, amount: float = 1.0) -> None:
        """For a family without labels."""
        self.labels().inc(amount)

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

    def set(self, value: float) -> None:
        """For a family without labels."""
        self.labels().set(value)

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

    def observe(self, value: float) -> None:
        """For a family without labels."""
        self.labels().observe(value)

    def collect(self) -> Metric:
        family = HistogramMetricFamily(self.name, self.doc, labels=self.labelnames)
        for key, counts in dict(self.counts).items():
            running, buckets = 0, []
            for bound, n in zip([*self.bounds, math.inf], counts, strict=True):
                running += n
                buckets.append(("+Inf" if bound == math.inf else repr(bound), running))
            family.add_metric(list(key), buckets, self.sums.get(key, 0.0))
        return family


class MetricGroup(Collector):
    """Families exported together: a subclass assigns its families in ``__init__``.

    One instance per registry (:func:`metric_group`), so a family is never registered twice
    however many services of a process use it.
    """

    def families(self) -> list[_Family]:
        return [v for v in vars(self).values() if isinstance(v, _Family)]

    def collect(self) -> Iterator[Metric]:
        for family in self.families():
            yield family.collect()

    def describe(self) -> Iterator[Metric]:
        return self.collect()


G = TypeVar("G", bound=MetricGroup)

_groups: dict[tuple[type[MetricGroup], int], MetricGroup] = {}


def metric_group(cls: type[G], registry: CollectorRegistry = REGISTRY) -> G:
    """The one ``cls`` of ``registry`` (created and registered on first use)."""
    key = (cls, id(registry))
    found = _groups.get(key)
    if found is None:
        found = _groups[key] = cls()
        registry.register(found)
    assert isinstance(found, cls)
    return found


# Names dashboards and alert rules rely on (infra/grafana, infra/prometheus).  Counters are
# declared without ``_total``: the exposition adds it (``strata_messages_consumed_total``).
MESSAGES_CONSUMED: Final = "strata_messages_consumed"
MESSAGES_PRODUCED: Final = "strata_messages_produced"
MESSAGES_HANDLED: Final = "strata_messages_handled"
HANDLER_SECONDS: Final = "strata_handler_seconds"
RETRIES: Final = "strata_retries"
DLQ_MESSAGES: Final = "strata_dlq_messages"
DLQ_DEPTH: Final = "strata_dlq_depth"
DUPLICATES_SKIPPED: Final = "strata_duplicates_skipped"
CONSUMER_LAG: Final = "strata_consumer_lag"
RETRY_BUDGET_EXHAUSTED: Final = "strata_retry_budget_exhausted"
RESULTS: Final = "strata_results"
STAGE_SECONDS: Final = "strata_stage_seconds"
REQUEST_COST_USD: Final = "strata_request_cost_usd"

COST_BUCKETS_USD = (
    0.00001,
    0.0001,
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
)


class BusMetrics(MetricGroup):
    """The consumer/producer metrics of the bus (one instance per registry)."""

    def __init__(self) -> None:
        self.consumed = Counter(MESSAGES_CONSUMED, "records received", ["service", "topic"])
        self.produced = Counter(
            MESSAGES_PRODUCED, "records acknowledged by the broker", ["service", "topic"]
        )
        # outcome: ok | expired | dlq_<failure class>
        self.handled = Counter(
            MESSAGES_HANDLED, "records by outcome", ["service", "topic", "outcome"]
        )
        self.handler_seconds = Histogram(
            HANDLER_SECONDS, "handler latency, seconds", ["service", "topic"]
        )
        self.retries = Counter(RETRIES, "handler retries", ["service", "topic"])
        self.dlq = Counter(
            DLQ_MESSAGES,
            "records sent to a dead-letter topic",
            ["service", "topic", "failure_class"],
        )
        self.duplicates = Counter(
            DUPLICATES_SKIPPED,
            "redelivered records skipped by idempotency",
            ["service", "topic"],
        )
        self.lag = Gauge(
            CONSUMER_LAG,
            "records behind the end of the partition (high watermark minus committed offset)",
            ["service", "group", "topic", "partition"],
        )
        self.retry_budget_exhausted = Counter(
            RETRY_BUDGET_EXHAUSTED,
            "failures not retried because the retry budget was empty",
            ["service"],
        )
        self.dlq_depth = Gauge(
            DLQ_DEPTH, "records in a dead-letter topic not redriven yet", ["topic"]
        )


class ResultMetrics(MetricGroup):
    """What the mesh answered: one observation per ``RequestCompleted`` a stage publishes.

    Counted where the result is published (any stage may end a request: guard, route's
    refusals, consensus's escalation, an expiry anywhere), so error rate, per-stage latency
    and cost per request do not depend on which services a process runs.
    """

    def __init__(self) -> None:
        # status: CompletionStatus (ok, blocked, overloaded, over_budget, expired, ...)
        self.results = Counter(RESULTS, "requests completed, by status", ["service", "status"])
        self.stage_seconds = Histogram(
            STAGE_SECONDS,
            "per-stage latency of completed requests (the result's stage_latency_ms), seconds",
            ["stage"],
        )
        self.cost_usd = Histogram(
            REQUEST_COST_USD,
            "model cost of one completed request, USD",
            ["tenant"],
            COST_BUCKETS_USD,
        )


def bus_metrics(registry: CollectorRegistry = REGISTRY) -> BusMetrics:
    """The one :class:`BusMetrics` of ``registry`` (created and registered on first use)."""
    return metric_group(BusMetrics, registry)


def result_metrics(registry: CollectorRegistry = REGISTRY) -> ResultMetrics:
    """The one :class:`ResultMetrics` of ``registry``."""
    return metric_group(ResultMetrics, registry)


# Registered at import: the bus and result families are exported from the start.
bus_metrics()
result_metrics()


def serve_metrics(port: int, registry: CollectorRegistry = REGISTRY, addr: str = "0.0.0.0") -> None:
    """Serve ``/metrics`` on ``port`` from a background thread."""
    start_http_server(port, addr=addr, registry=registry)
