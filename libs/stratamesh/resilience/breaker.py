"""Circuit breaker for calls to a remote dependency (DESIGN.md §4, infer).

::

             3 consecutive failures, or ≥ 10 % of ≥ min_calls calls failed in 10 s
    CLOSED ───────────────────────────────────────────────────────────────────► OPEN
      ▲                                                                          │
      │ `probes` probe calls succeeded              recovery_s passed            │
      │                                                                          ▼
      └──────────────────────────────── HALF_OPEN ◄──────────────────────────────┘
                                            │ a probe failed
                                            └──────────────────────────────────► OPEN

A caller takes a :class:`Permit` (:meth:`CircuitBreaker.acquire`; raises
:class:`CircuitOpen` — a :class:`~stratamesh.errors.Transient` whose ``retry_after`` is the
time left until the breaker half-opens — when no call may go out), makes the call, and
reports its outcome with :meth:`~CircuitBreaker.success`, :meth:`~CircuitBreaker.failure`
or :meth:`~CircuitBreaker.ignore`.  Rate limiting by the dependency (HTTP 429) and our own
overload are not the dependency failing: report them with ``ignore``, so they never open
the breaker.  Outcomes of permits issued before the last state change are disregarded (a
slow call that started while closed does not decide a half-open trial).

Half-open admits at most ``probes`` trial calls at a time; ``probes`` successes close it,
any probe failure re-opens it for another ``recovery_s``.

The breaker runs on one event loop (no locks); the clock is injectable for tests.
:func:`breaker_metrics` exports the state of every live breaker to Prometheus as
``strata_circuit_breaker_state`` (0 closed, 1 half-open, 2 open).
"""

from __future__ import annotations

import enum
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Final

import structlog
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from stratamesh.errors import Transient
from stratamesh.obs.metrics import REGISTRY

__all__ = [
    "BreakerState",
    "CircuitBreaker",
    "CircuitOpen",
    "Permit",
    "breaker_metrics",
]

log = structlog.get_logger("stratamesh.resilience")

DEFAULT_PROBE_WAIT_S: Final = 1.0


class BreakerState(enum.IntEnum):
    """Breaker states; the value is the ``strata_circuit_breaker_state`` gauge."""

    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


class CircuitOpen(Transient):
    """The breaker refused the call; retry after ``retry_after`` seconds."""

    def __init__(self, name: str, retry_after: float) -> None:
        super().__init__(
            f"circuit breaker {name!r} is open (retry in {retry_after:.2f}s)",
            retry_after=retry_after,
        )
        self.breaker = name


@dataclass(frozen=True, slots=True)
class Permit:
    """Leave to make one call; hand it back with the call's outcome."""

    generation: int
    probe: bool


class CircuitBreaker:
    def __init__(
        self,
        name: str,
        *,
        consecutive_failures: int = 3,
        error_rate: float = 0.10,
        window_s: float = 10.0,
        min_calls: int = 20,
        recovery_s: float = 60.0,
        probes: int = 3,
        probe_wait_s: float = DEFAULT_PROBE_WAIT_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if consecutive_failures < 1 or probes < 1 or min_calls < 1:
            raise ValueError("consecutive_failures, probes and min_calls must be ≥ 1")
        self.name = name
        self.consecutive_failures = consecutive_failures
        self.error_rate = error_rate
        self.window_s = window_s
        self.min_calls = min_calls
        self.recovery_s = recovery_s
        self.probes = probes
        self.probe_wait_s = probe_wait_s
        self._clock = clock
        self._state = BreakerState.CLOSED
        self._generation = 0
        self._opened_at = 0.0
        self._consecutive = 0
        self._window: deque[tuple[float, bool]] = deque()  # (time, failed)
        self._window_failures = 0
        self._probes_in_flight = 0
        self._probe_successes = 0
        self.opened = 0  # times the breaker opened
        self.rejected = 0  # calls refused while open or half-open
        _live[name] = self

    # -- state ----------------------------------------------------------------------------

    @property
    def state(self) -> BreakerState:
        if self._state is BreakerState.OPEN and self._clock() >= self._opened_at + self.recovery_s:
            self._enter(BreakerState.HALF_OPEN)
        return self._state

    def retry_after(self) -> float:
        """Seconds until a call may be admitted again (0 when one may go now)."""
        state = self.state
        if state is BreakerState.OPEN:
            return max(0.0, self._opened_at + self.recovery_s - self._clock())
        if state is BreakerState.HALF_OPEN and not self._probe_slot():
            return self.probe_wait_s
        return 0.0

    def _probe_slot(self) -> bool:
        return self._probes_in_flight + self._probe_successes < self.probes

    def _enter(self, state: BreakerState) -> None:
        previous = self._state
        self._state = state
        self._generation += 1
        self._consecutive = 0
        self._probes_in_flight = 0
        self._probe_successes = 0
        if state is BreakerState.OPEN:
            self._opened_at = self._clock()
            self.opened += 1
        if state is BreakerState.CLOSED:
            self._window.clear()
            self._window_failures = 0
        log.info(
            "circuit breaker state", breaker=self.name, state=state.name, previous=previous.name
        )

    # -- calls ----------------------------------------------------------------------------

    def acquire(self) -> Permit:
        """A permit for one call, or :class:`CircuitOpen`."""
        state = self.state
        if state is BreakerState.CLOSED:
            return Permit(self._generation, probe=False)
        if state is BreakerState.HALF_OPEN and self._probe_slot():
            self._probes_in_flight += 1
            return Permit(self._generation, probe=True)
        self.rejected += 1
        raise CircuitOpen(self.name, self.retry_after())

    def success(self, permit: Permit) -> None:
        if permit.generation != self._generation:
            return
        if permit.probe:
            self._probes_in_flight -= 1
            self._probe_successes += 1
            if self._probe_successes >= self.probes:
                self._enter(BreakerState.CLOSED)
            return
        self._consecutive = 0
        self._record(failed=False)

    def failure(self, permit: Permit) -> None:
        if permit.generation != self._generation:
            return
        if permit.probe:
            self._enter(BreakerState.OPEN)
            return
        self._consecutive += 1
        self._record(failed=True)
        if self._consecutive >= self.consecutive_failures or self._rate_exceeded():
            self._enter(BreakerState.OPEN)

    def ignore(self, permit: Permit) -> None:
        """The call's outcome says nothing about the dependency's health (429, overload)."""
        if permit.generation == self._generation and permit.probe:
            self._probes_in_flight -= 1

    # -- the error-rate window ------------------------------------------------------------

    def _record(self, *, failed: bool) -> None:
        now = self._clock()
        self._window.append((now, failed))
        self._window_failures += failed
        horizon = now - self.window_s
        while self._window and self._window[0][0] < horizon:
            _, old_failed = self._window.popleft()
            self._window_failures -= old_failed

    def _rate_exceeded(self) -> bool:
        calls = len(self._window)
        return calls >= self.min_calls and self._window_failures >= self.error_rate * calls


# -- metrics ---------------------------------------------------------------------------------

_live: weakref.WeakValueDictionary[str, CircuitBreaker] = weakref.WeakValueDictionary()


class _BreakerCollector(Collector):
    def collect(self) -> Iterator[Metric]:
        state = GaugeMetricFamily(
            "strata_circuit_breaker_state",
            "circuit breaker state: 0 closed, 1 half-open, 2 open",
            labels=["breaker"],
        )
        opened = CounterMetricFamily(
            "strata_circuit_breaker_opened", "times the breaker opened", labels=["breaker"]
        )
        rejected = CounterMetricFamily(
            "strata_circuit_breaker_rejected",
            "calls refused by an open breaker",
            labels=["breaker"],
        )
        for name, breaker in sorted(_live.items()):
            state.add_metric([name], float(breaker.state))
            opened.add_metric([name], float(breaker.opened))
            rejected.add_metric([name], float(breaker.rejected))
        yield state
        yield opened
        yield rejected

    def describe(self) -> Iterator[Metric]:
        return self.collect()


_registered: set[int] = set()


def breaker_metrics(registry: CollectorRegistry = REGISTRY) -> None:
    """Export every live breaker's state from ``registry`` (idempotent)."""
    if id(registry) not in _registered:
        registry.register(_BreakerCollector())
        _registered.add(id(registry))


# Registered at import: the breaker families are exported (empty) before any breaker exists.
breaker_metrics()
