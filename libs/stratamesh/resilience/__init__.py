"""Resilience primitives: backoff, retry budget, circuit breaker (degradation comes next)."""

from stratamesh.resilience.breaker import (
    BreakerState,
    CircuitBreaker,
    CircuitOpen,
    Permit,
    breaker_metrics,
)
from stratamesh.resilience.retry import Backoff, RetryBudget

__all__ = [
    "Backoff",
    "BreakerState",
    "CircuitBreaker",
    "CircuitOpen",
    "Permit",
    "RetryBudget",
    "breaker_metrics",
]
