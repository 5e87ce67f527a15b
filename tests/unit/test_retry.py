from __future__ import annotations

import random

from stratamesh.errors import (
    DecodeError,
    FailureClass,
    Poison,
    SignatureError,
    Transient,
    classify,
)
from stratamesh.resilience.retry import Backoff, RetryBudget


def test_backoff_is_jittered_exponential_and_capped() -> None:
    b = Backoff(base_s=0.1, max_s=1.0)
    rng = random.Random(1)
    for failures, cap in [(1, 0.1), (2, 0.2), (3, 0.4), (4, 0.8), (5, 1.0), (12, 1.0)]:
        delays = [b.delay(failures, rng) for _ in range(200)]
        assert all(0 <= d <= cap for d in delays)
        assert max(delays) > cap * 0.8  # full jitter actually spreads up to the cap


def test_retry_budget_limits_retries_to_a_fraction_of_traffic() -> None:
    now = [0.0]
    budget = RetryBudget(ratio=0.2, min_per_s=0.0, max_tokens=100, clock=lambda: now[0])
    assert not budget.try_withdraw()  # nothing deposited, no floor
    for _ in range(100):
        budget.deposit()
    granted = sum(budget.try_withdraw() for _ in range(100))
    assert granted == 20


def test_retry_budget_floor_refills_with_time() -> None:
    now = [0.0]
    budget = RetryBudget(ratio=0.0, min_per_s=5.0, max_tokens=5, clock=lambda: now[0])
    assert sum(budget.try_withdraw() for _ in range(50)) == 5
    now[0] += 1.0
    assert sum(budget.try_withdraw() for _ in range(50)) == 5


def test_classification_is_data() -> None:
    v = classify(Transient("503", retry_after=2.0))
    assert v.retryable and v.retry_after == 2.0 and v.failure is FailureClass.EXHAUSTED
    assert classify(TimeoutError()).retryable
    assert classify(ConnectionResetError()).retryable
    assert classify(RuntimeError("bug or blip")).retryable
    for exc, failure in [
        (Poison("x"), FailureClass.POISON),
        (DecodeError("x"), FailureClass.POISON),
        (ValueError("x"), FailureClass.POISON),
        (SignatureError("x"), FailureClass.SECURITY),
    ]:
        v = classify(exc)
        assert not v.retryable and v.failure is failure
