"""One interface for every language-model backend: chat completion, streamed or not.

A backend answers a :class:`CompletionRequest` (chat messages, :class:`Sampling`, an
optional JSON schema for structured output, an optional LoRA adapter, a timeout) with a
:class:`Completion`: text, parsed JSON when a schema was asked for, token usage, the model
id and revision that produced it, TTFT and total latency.  :meth:`LLMBackend.stream`
yields the text as it is generated and exposes the same :class:`Completion` once it ends
(TTFT is measured there: the time to the first non-empty piece of text).

Failures are the error taxonomy's, so callers (the infer service's fallback chain, the
consumer middleware) decide uniformly::

    timeout, connection error, HTTP 5xx/408, malformed body   → BackendUnavailable (Transient)
    HTTP 429, server or local queue full                      → RateLimited (Transient; a
                                                                 breaker must ignore it)
    other HTTP 4xx, a request the model cannot take            → Poison
    JSON output that does not parse                            → InvalidOutput (Poison)
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

from stratamesh.errors import Poison, Transient

__all__ = [
    "BackendUnavailable",
    "ChatMessage",
    "Completion",
    "CompletionRequest",
    "CompletionStream",
    "InvalidOutput",
    "LLMBackend",
    "RateLimited",
    "Role",
    "Sampling",
    "Usage",
    "parse_structured",
]

Role = Literal["system", "user", "assistant", "tool"]


class BackendUnavailable(Transient):
    """The backend failed or did not answer in time: counts against its breaker."""


class RateLimited(Transient):
    """The backend (or our own queue in front of it) is saturated: retry later, and do
    not count it as the backend failing."""


class InvalidOutput(Poison):
    """The model's output does not satisfy the requested JSON schema's syntax."""


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: Role
    content: str


@dataclass(frozen=True, slots=True)
class Sampling:
    """Sampling parameters; recorded verbatim on every answer (``as_params``)."""

    temperature: float = 0.0
    top_p: float = 1.0
    max_tokens: int = 256
    seed: int = 0
    stop: tuple[str, ...] = ()

    def as_params(self) -> dict[str, str]:
        params = {
            "temperature": repr(self.temperature),
            "top_p": repr(self.top_p),
            "max_tokens": str(self.max_tokens),
        }
        if self.stop:
            params["stop"] = json.dumps(list(self.stop))
        return params


@dataclass(frozen=True, slots=True)
class CompletionRequest:
    messages: Sequence[ChatMessage]
    sampling: Sampling = Sampling()
    json_schema: Mapping[str, Any] | None = None
    adapter: str | None = None
    timeout_s: float | None = None


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass(frozen=True, slots=True)
class Completion:
    text: str
    usage: Usage
    model: str
    revision: str
    adapter: str | None = None
    finish_reason: str | None = None
    structured: Any = None
    ttft_ms: float | None = None
    latency_ms: float = 0.0
    backend: str = ""


def parse_structured(text: str) -> Any:
    """The JSON value of a structured answer (tolerates a fenced block around it)."""
    body = text.strip()
    if body.startswith("```"):
        body = body.strip("`").removeprefix("json").strip()
    try:
        return json.loads(body)
    except json.JSONDecodeError as exc:
        raise InvalidOutput(f"structured output is not JSON: {exc.msg} at {exc.pos}") from None


@dataclass(slots=True)
class CompletionStream:
    """Text pieces as they arrive; :attr:`result` once the iterator is exhausted.

    ``started`` is the caller-side start (perf_counter seconds) the TTFT is measured from.
    """

    pieces: AsyncIterator[str]
    started: float = field(default_factory=time.perf_counter)
    result: Completion | None = None

    def __aiter__(self) -> AsyncIterator[str]:
        return self.pieces

    @classmethod
    def of(cls, produce: Callable[[CompletionStream], AsyncIterator[str]]) -> CompletionStream:
        """A stream whose pieces come from ``produce(stream)``, which sets ``result`` at its end."""
        out = cls(pieces=_nothing())
        out.pieces = produce(out)
        return out

    async def collect(self) -> Completion:
        """Drain the stream and return its result."""
        async for _ in self.pieces:
            pass
        if self.result is None:
            raise BackendUnavailable("the stream ended without a result")
        return self.result


async def _nothing() -> AsyncIterator[str]:
    return
    yield  # an async generator that yields nothing


@runtime_checkable
class LLMBackend(Protocol):
    """A language model behind one interface (see the module docstring)."""

    @property
    def name(self) -> str:
        """Backend instance name: the breaker's name and the metrics label."""
        ...

    @property
    def model(self) -> str:
        """Model id as recorded in events (without revision)."""
        ...

    @property
    def revision(self) -> str: ...

    async def complete(self, request: CompletionRequest) -> Completion: ...

    def stream(self, request: CompletionRequest) -> CompletionStream: ...

    async def start(self) -> None:
        """Load the model / open connections (idempotent)."""
        ...

    async def close(self) -> None: ...
