"""Resilience primitives: backoff, retry budget (circuit breakers and degradation come next)."""

from stratamesh.resilience.retry import Backoff, RetryBudget

__all__ = ["Backoff", "RetryBudget"]
