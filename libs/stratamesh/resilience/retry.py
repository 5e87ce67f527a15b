"""Retry policy as data: exponential backoff with full jitter, and a retry budget."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass

from stratamesh.config import RetrySettings

__all__ = ["Backoff", "RetryBudget"]


@dataclass(frozen=True, slots=True)
class Backoff:
    """Delay before attempt ``n + 1`` after ``n`` failures: uniform in [0, min(max, base·2ⁿ⁻¹)].

    Full jitter (rather than a fixed schedule) spreads the retries of many consumers that
    failed at the same moment, e.g. when a shared dependency blipped.
    """

    base_s: float = 0.2
    max_s: float = 10.0

    @classmethod
    def from_settings(cls, s: RetrySettings) -> Backoff:
        return cls(s.base_delay_s, s.max_delay_s)

    def delay(self, failures: int, rng: random.Random | None = None) -> float:
        cap = min(self.max_s, self.base_s * 2 ** max(failures - 1, 0))
        return (rng or random).uniform(0, cap)


class RetryBudget:
    """Caps retries to a fraction of first attempts (Finagle-style), with a floor per second.

    Each first attempt deposits ``ratio`` tokens; each retry withdraws one.  Without it, a
    dependency outage turns every record into ``attempts`` calls and the retries themselves
    keep the dependency down.  The floor keeps a quiet service able to retry at all.
    """

    def __init__(
        self,
        ratio: float = 0.2,
        min_per_s: float = 10.0,
        max_tokens: float = 1000.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ratio = ratio
        self.min_per_s = min_per_s
        self.max_tokens = max_tokens
        self._clock = clock
        self._tokens = min(max_tokens, 10 * min_per_s)
        self._last = clock()

    @classmethod
    def from_settings(cls, s: RetrySettings) -> RetryBudget:
        return cls(s.budget_ratio, s.budget_min_per_s)

    def _refill(self, extra: float = 0.0) -> None:
        now = self._clock()
        gained = (now - self._last) * self.min_per_s + extra
        self._tokens = min(self.max_tokens, self._tokens + gained)
        self._last = now

    def deposit(self) -> None:
        """Record a first attempt."""
        self._refill(self.ratio)

    def try_withdraw(self) -> bool:
        """Take a token for one retry; False when the budget is empty."""
        self._refill()
        if self._tokens >= 1.0 - 1e-9:  # 5 × 0.2 must buy one retry despite rounding
            self._tokens -= 1.0
            return True
        return False
