"""The circuit breaker's state machine, on a fake clock."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from stratamesh.errors import Transient, classify
from stratamesh.resilience import BreakerState, CircuitBreaker, CircuitOpen, breaker_metrics


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def breaker(clock: Clock, **kw: float) -> CircuitBreaker:
    return CircuitBreaker("dep", clock=clock, **kw)  # type: ignore[arg-type]


def fail(b: CircuitBreaker, n: int = 1) -> None:
    for _ in range(n):
        b.failure(b.acquire())


def succeed(b: CircuitBreaker, n: int = 1) -> None:
    for _ in range(n):
        b.success(b.acquire())


def test_three_consecutive_failures_open_it(clock: Clock) -> None:
    b = breaker(clock)
    fail(b, 2)
    succeed(b)  # a success resets the run
    fail(b, 2)
    assert b.state is BreakerState.CLOSED
    fail(b)
    assert b.state is BreakerState.OPEN and b.opened == 1
    with pytest.raises(CircuitOpen):
        b.acquire()
    assert b.rejected == 1


def test_open_refusal_is_transient_with_time_until_half_open(clock: Clock) -> None:
    b = breaker(clock, recovery_s=60)
    fail(b, 3)
    clock.now += 45
    with pytest.raises(CircuitOpen) as raised:
        b.acquire()
    assert isinstance(raised.value, Transient)
    assert raised.value.retry_after == pytest.approx(15.0)
    verdict = classify(raised.value)
    assert verdict.retryable and verdict.retry_after == pytest.approx(15.0)
    assert b.retry_after() == pytest.approx(15.0)


def test_error_rate_in_the_window_opens_it_above_a_minimum_volume(clock: Clock) -> None:
    b = breaker(clock, min_calls=20, error_rate=0.10, window_s=10)
    for i in range(18):
        succeed(b)
        if i == 4:
            fail(b)  # never consecutive failures
        clock.now += 0.1
    assert b.state is BreakerState.CLOSED  # 1 of 19 failed
    fail(b)  # 2 of 20 = 10 %: at the threshold (judged when a call fails)
    assert b.state is BreakerState.OPEN


def test_error_rate_below_the_minimum_volume_does_not_open_it(clock: Clock) -> None:
    b = breaker(clock, min_calls=20)
    for _ in range(4):
        fail(b)
        succeed(b, 2)
    # 4 of 12 calls failed (33 %), but 12 < 20 calls
    assert b.state is BreakerState.CLOSED


def test_old_calls_leave_the_window(clock: Clock) -> None:
    b = breaker(clock, min_calls=20, window_s=10)
    fail(b)
    succeed(b)
    fail(b)
    succeed(b)
    clock.now += 11  # both failures age out
    succeed(b, 17)
    fail(b)  # 1 of 18 in the window: 5.6 %, and only 18 calls
    succeed(b, 5)
    fail(b)  # 2 of 25 = 8 %
    assert b.state is BreakerState.CLOSED
    succeed(b, 2)
    fail(b)  # 3 of 28 = 10.7 %
    assert b.state is BreakerState.OPEN


def test_half_open_after_recovery_admits_three_probes_and_closes(clock: Clock) -> None:
    b = breaker(clock, recovery_s=60, probes=3)
    fail(b, 3)
    clock.now += 59.9
    assert b.state is BreakerState.OPEN
    clock.now += 0.1
    assert b.state is BreakerState.HALF_OPEN
    probes = [b.acquire() for _ in range(3)]
    assert all(p.probe for p in probes)
    with pytest.raises(CircuitOpen):
        b.acquire()  # a fourth concurrent call waits for the trial
    assert b.retry_after() == pytest.approx(b.probe_wait_s)
    b.success(probes[0])
    b.success(probes[1])
    assert b.state is BreakerState.HALF_OPEN
    b.success(probes[2])
    assert b.state is BreakerState.CLOSED
    assert not b.acquire().probe


def test_a_failed_probe_reopens_for_a_full_recovery_period(clock: Clock) -> None:
    b = breaker(clock, recovery_s=60)
    fail(b, 3)
    clock.now += 60
    first, second = b.acquire(), b.acquire()
    b.success(first)
    b.failure(second)
    assert b.state is BreakerState.OPEN and b.opened == 2
    assert b.retry_after() == pytest.approx(60.0)
    clock.now += 60
    assert b.state is BreakerState.HALF_OPEN


def test_rate_limits_and_overload_never_count(clock: Clock) -> None:
    b = breaker(clock, min_calls=5)
    for _ in range(50):
        b.ignore(b.acquire())  # e.g. HTTP 429
    assert b.state is BreakerState.CLOSED
    fail(b, 3)
    clock.now += 60
    probe = b.acquire()
    b.ignore(probe)  # an ignored probe frees its slot and decides nothing
    assert b.state is BreakerState.HALF_OPEN
    succeed(b, 3)
    assert b.state is BreakerState.CLOSED


def test_outcomes_of_permits_from_before_a_state_change_are_ignored(clock: Clock) -> None:
    b = breaker(clock)
    slow = b.acquire()  # a call that started while closed ...
    fail(b, 3)
    clock.now += 60
    assert b.state is BreakerState.HALF_OPEN
    b.failure(slow)  # ... and failed during the trial: not a probe failure
    assert b.state is BreakerState.HALF_OPEN
    succeed(b, 3)
    assert b.state is BreakerState.CLOSED
    b.failure(slow)  # nor does it count against the new closed period
    fail(b, 2)
    assert b.state is BreakerState.CLOSED


def test_state_is_exported_for_metrics(clock: Clock) -> None:
    registry = CollectorRegistry()
    breaker_metrics(registry)
    breaker_metrics(registry)  # idempotent
    b = CircuitBreaker("metrics-test-dep", clock=clock)
    assert registry.get_sample_value(
        "strata_circuit_breaker_state", {"breaker": "metrics-test-dep"}
    ) == float(BreakerState.CLOSED)
    fail(b, 3)
    assert registry.get_sample_value(
        "strata_circuit_breaker_state", {"breaker": "metrics-test-dep"}
    ) == float(BreakerState.OPEN)
    assert (
        registry.get_sample_value(
            "strata_circuit_breaker_opened_total", {"breaker": "metrics-test-dep"}
        )
        == 1.0
    )


def test_invalid_parameters() -> None:
    with pytest.raises(ValueError):
        CircuitBreaker("x", probes=0)
