"""One JSON call to a model server, judged for its circuit breaker and classified as data.

Every remote model client (embeddings, reranker, language models) talks to servers that fail
the same ways, so the verdicts live here once:

=====================  ================  ===========================================
outcome                breaker           raised
=====================  ================  ===========================================
2xx, parseable         success           —
timeout                failure           :class:`Transient` (not retried here: the
                                         deadline is the caller's to spend)
connection error       failure           :class:`Retryable`
HTTP 5xx / 408         failure           :class:`Retryable`
HTTP 429               not counted       :class:`Transient` with ``retry_after``
other 4xx              success           :class:`Poison` (the server refuses *this* input)
2xx, malformed body    failure           :class:`Transient`
cancelled / our bug    not counted       re-raised as is
=====================  ================  ===========================================

:func:`with_retries` retries :class:`Retryable` failures inside a retry budget with backoff.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

import httpx

from stratamesh.errors import Poison, Transient
from stratamesh.resilience.breaker import CircuitBreaker
from stratamesh.resilience.retry import Backoff, RetryBudget

__all__ = ["Retryable", "post_json", "retry_after_s", "with_retries"]

T = TypeVar("T")


class Retryable(Transient):
    """A failure the client may retry at once (connection error, 5xx)."""


def retry_after_s(value: str | None) -> float | None:
    """A ``Retry-After`` header in seconds (None for an HTTP date or garbage)."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None  # an HTTP date: let the backoff decide
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


async def post_json(
    client: httpx.AsyncClient,
    url: str,
    body: Mapping[str, Any],
    *,
    breaker: CircuitBreaker,
    parse: Callable[[Any], T],
    what: str,
    headers: Mapping[str, str] | None = None,
    timeout_s: float | None = None,
) -> T:
    """POST ``body`` as JSON and return ``parse(response JSON)``, judged as the table says.

    ``parse`` raises ValueError / KeyError / TypeError / IndexError on a malformed body.
    ``what`` names the server in error messages ("embedding endpoint", "reranker", ...).
    """
    permit = breaker.acquire()  # CircuitOpen (Transient) when open
    kw: dict[str, Any] = {"json": body, "headers": dict(headers or {})}
    if timeout_s is not None:
        kw["timeout"] = httpx.Timeout(timeout_s)
    try:
        response = await client.post(url, **kw)
    except httpx.TimeoutException as exc:
        breaker.failure(permit)
        raise Transient(f"{what} timed out") from exc
    except httpx.TransportError as exc:
        breaker.failure(permit)
        raise Retryable(f"{what} unreachable: {exc!r}") from exc
    except BaseException:
        breaker.ignore(permit)  # cancelled, or our own bug: not the server's health
        raise
    status = response.status_code
    if status == 429:
        breaker.ignore(permit)
        raise Transient(
            f"{what} is rate limiting (HTTP 429)",
            retry_after=retry_after_s(response.headers.get("retry-after")),
        )
    if status >= 500 or status == 408:
        breaker.failure(permit)
        raise Retryable(f"{what} failed: HTTP {status}: {response.text[:200]}")
    if status >= 400:
        breaker.success(permit)  # the server is healthy; it refuses this input
        raise Poison(f"{what} rejected the input: HTTP {status}: {response.text[:300]}")
    try:
        result = parse(response.json())
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        breaker.failure(permit)
        raise Transient(f"{what} sent a malformed response: {exc}") from exc
    breaker.success(permit)
    return result


async def with_retries(
    call: Callable[[], Awaitable[T]],
    *,
    retries: int,
    budget: RetryBudget,
    backoff: Backoff,
) -> T:
    """``await call()``, retrying :class:`Retryable` failures up to ``retries`` times while
    the retry budget allows (every call deposits into the budget first)."""
    budget.deposit()
    attempt = 0
    while True:
        try:
            return await call()
        except Retryable:
            attempt += 1
            if attempt > retries or not budget.try_withdraw():
                raise
            await asyncio.sleep(backoff.delay(attempt))
