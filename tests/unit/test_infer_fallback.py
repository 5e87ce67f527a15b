"""The fallback chain: breakers per backend, what counts as a failure, the attempt budget.

:class:`FakeBackend` (a scripted backend) is shared with the other infer unit tests.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

import pytest

from stratamesh.errors import Poison
from stratamesh.models.llm.base import (
    BackendUnavailable,
    ChatMessage,
    Completion,
    CompletionRequest,
    CompletionStream,
    InvalidOutput,
    LLMBackend,
    RateLimited,
    Sampling,
    Usage,
    parse_structured,
)
from stratamesh.resilience.breaker import BreakerState
from stratamesh.services.infer.fallback import Attempts, ChainFailed, FallbackChain, GuardedBackend

Script = Callable[[CompletionRequest], str | BaseException]


class FakeBackend:
    def __init__(
        self,
        name: str,
        reply: str | Script = "ok [1]",
        *,
        model: str = "fake-model",
        delay: float = 0,
    ) -> None:
        self._name = name
        self._model = model
        self.reply = reply
        self.delay = delay
        self.calls: list[CompletionRequest] = []
        self.started = 0

    @property
    def name(self) -> str:
        return self._name

    @property
    def model(self) -> str:
        return self._model

    @property
    def revision(self) -> str:
        return "rev1"

    async def start(self) -> None:
        self.started += 1

    async def close(self) -> None:
        return None

    async def complete(self, request: CompletionRequest) -> Completion:
        return await self.stream(request).collect()

    def stream(self, request: CompletionRequest) -> CompletionStream:
        return CompletionStream.of(lambda out: self._run(request, out))

    async def _run(self, request: CompletionRequest, out: CompletionStream) -> AsyncIterator[str]:
        self.calls.append(request)
        if self.delay:
            await asyncio.sleep(self.delay)
        reply = self.reply(request) if callable(self.reply) else self.reply
        if isinstance(reply, BaseException):
            raise reply
        ttft = (time.perf_counter() - out.started) * 1000
        yield reply
        out.result = Completion(
            text=reply,
            usage=Usage(sum(len(m.content.split()) for m in request.messages), len(reply.split())),
            model=self._model,
            revision="rev1",
            adapter=request.adapter,
            finish_reason="stop",
            structured=parse_structured(reply) if request.json_schema is not None else None,
            ttft_ms=ttft,
            latency_ms=(time.perf_counter() - out.started) * 1000,
            backend=self._name,
        )


MESSAGES = [ChatMessage("user", "q")]


def make(backend: LLMBackend, remaining: float | None) -> CompletionRequest:
    return CompletionRequest(MESSAGES, Sampling(), timeout_s=remaining)


def chain(*backends: FakeBackend) -> FallbackChain:
    return FallbackChain([GuardedBackend.of(b) for b in backends])


async def test_first_healthy_backend_answers() -> None:
    a, b = FakeBackend("a", "from a"), FakeBackend("b", "from b")
    done = await chain(a, b).run(make, Attempts(3))
    assert done.text == "from a" and len(a.calls) == 1 and b.calls == []


@pytest.mark.parametrize(
    "error",
    [
        BackendUnavailable("down"),
        RateLimited("busy"),
        Poison("unknown adapter"),
        InvalidOutput("x"),
    ],
)
async def test_any_backend_error_falls_through_to_the_next(error: Exception) -> None:
    a, b = FakeBackend("a", lambda r: error), FakeBackend("b", "from b")
    budget = Attempts(3)
    done = await chain(a, b).run(make, budget)
    assert done.text == "from b" and budget.left == 1 and len(budget.errors) == 1


async def test_only_unavailability_counts_against_the_breaker() -> None:
    down = FakeBackend("down", lambda r: BackendUnavailable("5xx"))
    busy = FakeBackend("busy", lambda r: RateLimited("429"))
    guarded_down, guarded_busy = GuardedBackend.of(down), GuardedBackend.of(busy)
    for _ in range(3):
        with pytest.raises(ChainFailed):
            await FallbackChain([guarded_busy, guarded_down]).run(make, Attempts(2))
    assert guarded_down.breaker.state is BreakerState.OPEN  # 3 consecutive failures
    assert guarded_busy.breaker.state is BreakerState.CLOSED  # 429s are not failures


async def test_an_open_breaker_is_skipped_without_spending_an_attempt() -> None:
    a, b = FakeBackend("a", lambda r: BackendUnavailable("down")), FakeBackend("b", "from b")
    ga, gb = GuardedBackend.of(a), GuardedBackend.of(b)
    for _ in range(3):
        ga.breaker.failure(ga.breaker.acquire())
    budget = Attempts(3)
    done = await FallbackChain([ga, gb]).run(make, budget)
    assert done.text == "from b" and a.calls == [] and budget.left == 2
    assert "open" in budget.errors[0]


async def test_the_attempt_budget_bounds_calls_across_rounds() -> None:
    a = FakeBackend("a", lambda r: RateLimited("busy"))
    budget = Attempts(3)
    with pytest.raises(ChainFailed):
        await chain(a).run(make, budget)
    assert len(a.calls) == 3 and budget.left == 0


async def test_every_breaker_open_fails_at_once() -> None:
    a = FakeBackend("a")
    ga = GuardedBackend.of(a)
    for _ in range(3):
        ga.breaker.failure(ga.breaker.acquire())
    budget = Attempts(3)
    with pytest.raises(ChainFailed, match="open"):
        await FallbackChain([ga]).run(make, budget)
    assert a.calls == [] and budget.left == 3


async def test_calls_get_the_time_left_and_stop_at_the_deadline() -> None:
    a = FakeBackend("a", lambda r: BackendUnavailable("slow"), delay=0.05)
    budget = Attempts(3, deadline=time.monotonic() + 0.12)
    with pytest.raises(ChainFailed):
        await chain(a).run(make, budget)
    timeouts = [r.timeout_s for r in a.calls]
    assert 1 <= len(timeouts) <= 3
    assert all(t is not None and 0 < t <= 0.12 for t in timeouts)
    assert timeouts == sorted(timeouts, reverse=True)
    expired = Attempts(3, deadline=time.monotonic() - 1)
    b = FakeBackend("b")
    with pytest.raises(ChainFailed):
        await chain(b).run(make, expired)
    assert b.calls == []


async def test_a_reserve_leaves_attempts_for_the_lower_tiers() -> None:
    a = FakeBackend("a", lambda r: RateLimited("busy"))
    budget = Attempts(3)
    with pytest.raises(ChainFailed):
        await chain(a).run(make, budget, reserve=1)
    assert len(a.calls) == 2 and budget.left == 1
