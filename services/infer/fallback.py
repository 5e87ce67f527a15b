"""The fallback chain: backends tried in order, each behind its own circuit breaker, inside
one request's attempt budget and deadline.

For each backend of the chain, in order (and around again while attempts and time last):

    breaker open                 → skip it (no attempt spent; no timeout paid)
    call succeeded               → breaker.success, done
    BackendUnavailable           → breaker.failure (timeouts, 5xx, connection errors)
    RateLimited                  → breaker.ignore (429 / server or local queue full)
    Poison / InvalidOutput       → breaker.ignore: the backend is healthy, this request is
                                   not (unknown adapter, output that is not JSON); the next
                                   backend may still take it

Every call gets the time left before the request's deadline as its timeout.  A request
spends at most ``attempts`` calls across all chains it tries (:class:`Attempts` is shared
by the tiers), so a dead dependency costs a bounded amount of work per request.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import structlog

from stratamesh.errors import HandlingError, Poison
from stratamesh.models.llm.base import (
    BackendUnavailable,
    Completion,
    CompletionRequest,
    LLMBackend,
    RateLimited,
)
from stratamesh.resilience.breaker import CircuitBreaker, CircuitOpen

__all__ = ["Attempts", "ChainFailed", "FallbackChain", "GuardedBackend"]

log = structlog.get_logger("stratamesh.infer")

# Below this much time left, a call cannot produce anything useful.
MIN_CALL_S = 0.05


@dataclass(slots=True)
class Attempts:
    """A request's call budget and deadline (``time.monotonic`` seconds; None = none)."""

    left: int
    deadline: float | None = None
    errors: list[str] = field(default_factory=list)

    def remaining_s(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.monotonic()

    @property
    def expired(self) -> bool:
        remaining = self.remaining_s()
        return remaining is not None and remaining < MIN_CALL_S


class ChainFailed(Exception):
    """Every backend of the chain failed, was open, or time/attempts ran out."""


@dataclass(slots=True)
class GuardedBackend:
    backend: LLMBackend
    breaker: CircuitBreaker

    @classmethod
    def of(cls, backend: LLMBackend, *, recovery_s: float = 60.0) -> GuardedBackend:
        return cls(backend, CircuitBreaker(f"llm:{backend.name}", recovery_s=recovery_s))


class FallbackChain:
    def __init__(self, members: Sequence[GuardedBackend]) -> None:
        if not members:
            raise ValueError("a fallback chain needs at least one backend")
        self.members = list(members)

    @property
    def names(self) -> list[str]:
        return [m.backend.name for m in self.members]

    async def run(
        self,
        make_request: Callable[[LLMBackend, float | None], CompletionRequest],
        budget: Attempts,
        *,
        reserve: int = 0,
    ) -> Completion:
        """The first completion any member gives; :class:`ChainFailed` when none does.

        ``reserve`` attempts stay in the budget for what the caller tries next (the lower
        tiers), so one chain cannot spend a request's whole budget.
        """
        while budget.left > reserve and not budget.expired:
            tried = False
            for member in self.members:
                if budget.left <= reserve or budget.expired:
                    break
                try:
                    permit = member.breaker.acquire()
                except CircuitOpen as exc:
                    budget.errors.append(f"{member.backend.name}: {exc}")
                    continue
                tried = True
                budget.left -= 1
                request = make_request(member.backend, budget.remaining_s())
                try:
                    completion = await member.backend.stream(request).collect()
                except RateLimited as exc:
                    member.breaker.ignore(permit)
                    budget.errors.append(_described(member, "rate limited", exc))
                except BackendUnavailable as exc:
                    member.breaker.failure(permit)
                    budget.errors.append(_described(member, "unavailable", exc))
                except (Poison, HandlingError) as exc:
                    member.breaker.ignore(permit)
                    budget.errors.append(_described(member, type(exc).__name__, exc))
                except BaseException:
                    member.breaker.ignore(permit)  # cancelled: says nothing about the backend
                    raise
                else:
                    member.breaker.success(permit)
                    return completion
                log.warning(
                    "backend call failed",
                    backend=member.backend.name,
                    error=budget.errors[-1][:200],
                )
            if not tried:
                break  # every breaker is open: going round again would only spin
        raise ChainFailed("; ".join(budget.errors[-6:]) or "no attempts left")


def _described(member: GuardedBackend, what: str, exc: BaseException) -> str:
    message = str(exc).removeprefix(f"{member.backend.name}: ")
    return f"{member.backend.name}: {what}: {message}"
