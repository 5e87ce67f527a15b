"""An OpenAI-compatible chat-completions backend over HTTP: vLLM first, any compatible server.

* ``POST {base_url}/v1/chat/completions`` with the served model name — or, when the request
  names a LoRA adapter, the adapter's served name (vLLM serves each ``--lora-modules
  NAME=PATH`` as a model of that name; ``adapters`` maps our ``id@revision`` onto it).
* Structured output: ``response_format = {"type": "json_schema", "json_schema": {"name",
  "schema", "strict": true}}`` (vLLM's guided decoding; OpenAI's structured outputs).
* Streaming: server-sent events (``stream: true`` with ``stream_options.include_usage`` so
  the last event carries the token usage); TTFT is measured from the call to the first
  non-empty content delta.
* ``seed`` is sent so a replay with the same sampling parameters can reproduce an answer
  where the server honours it (vLLM does, per request).

The whole call — connect, queueing in the server, generation — is bounded by
``request.timeout_s`` (the request's remaining deadline) or the backend's own timeout.
Failures are mapped as :mod:`stratamesh.models.llm.base` describes; a 503 that carries
``Retry-After`` is the server shedding load (vLLM's and most proxies' overload answer), so
it is :class:`RateLimited`, not a failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

import httpx
import structlog

from stratamesh.errors import Poison
from stratamesh.models.llm.base import (
    BackendUnavailable,
    Completion,
    CompletionRequest,
    CompletionStream,
    RateLimited,
    Usage,
    parse_structured,
)

__all__ = ["OpenAIChatBackend"]

log = structlog.get_logger("stratamesh.models.llm")

_ERROR_BODY_LIMIT = 300


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


# How long to wait, after ``[DONE]``, for the server to end the response body.
_DRAIN_S = 0.5


async def _drain(lines: AsyncIterator[str], budget_s: float) -> None:
    """Read a streamed body to its end (briefly): httpx returns a connection to the pool only
    when its response was read to the end; one left unread at ``[DONE]`` (the server's
    closing chunk not yet seen) is closed instead, so every streamed call would open a new
    connection (and TLS session).  A server that keeps the body open after ``[DONE]``
    just costs its connection, as before."""
    if budget_s <= 0:
        return
    with contextlib.suppress(TimeoutError, httpx.HTTPError):
        async with asyncio.timeout(budget_s):
            async for _ in lines:
                pass


def status_error(response: httpx.Response, body: str) -> Exception:
    """The taxonomy error of a failed HTTP answer (``body`` already read, for the message)."""
    code = response.status_code
    message = f"HTTP {code} from {response.request.url.path}: {body[:_ERROR_BODY_LIMIT]}"
    retry_after = _retry_after(response)
    if code == 429 or (code == 503 and retry_after is not None):
        return RateLimited(message, retry_after=retry_after)
    if code >= 500 or code == 408:
        return BackendUnavailable(message)
    return Poison(message)


class OpenAIChatBackend:
    """Chat completions at an OpenAI-compatible server (see the module docstring)."""

    def __init__(
        self,
        base_url: str,
        served_model: str,
        *,
        name: str = "openai",
        model_id: str | None = None,
        revision: str = "unpinned",
        api_key: str | None = None,
        timeout_s: float = 60.0,
        adapters: Mapping[str, str] | None = None,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        self._name = name
        self._served_model = served_model
        self._model = model_id or served_model
        self._revision = revision
        self._url = base_url.rstrip("/").removesuffix("/v1") + "/v1/chat/completions"
        self._timeout_s = timeout_s
        self._adapters = dict(adapters or {})
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._owns_client = client is None
        self._client = client or httpx.AsyncClient(headers=headers)
        if client is not None and headers:
            self._client.headers.update(headers)

    @property
    def name(self) -> str:
        return self._name

    @property
    def model(self) -> str:
        return self._model

    @property
    def revision(self) -> str:
        return self._revision

    async def start(self) -> None:
        """Nothing to load: the server is checked by the first call (and the breaker)."""

    async def close(self) -> None:
        if self._owns_client:
            await self._client.aclose()

    # -- request body ---------------------------------------------------------------------

    def served_name(self, adapter: str | None) -> str:
        if adapter is None:
            return self._served_model
        return self._adapters.get(adapter, adapter)

    def body(self, request: CompletionRequest, *, stream: bool) -> dict[str, Any]:
        s = request.sampling
        body: dict[str, Any] = {
            "model": self.served_name(request.adapter),
            "messages": [{"role": m.role, "content": m.content} for m in request.messages],
            "temperature": s.temperature,
            "top_p": s.top_p,
            "max_tokens": s.max_tokens,
            "seed": s.seed,
        }
        if s.stop:
            body["stop"] = list(s.stop)
        if request.json_schema is not None:
            body["response_format"] = {
                "type": "json_schema",
                "json_schema": {
                    "name": "answer",
                    "schema": dict(request.json_schema),
                    "strict": True,
                },
            }
        if stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        return body

    def _timeout(self, request: CompletionRequest) -> float:
        budget = self._timeout_s if request.timeout_s is None else request.timeout_s
        if budget <= 0:
            raise BackendUnavailable("no time left before the request's deadline")
        return budget

    # -- calls ----------------------------------------------------------------------------

    async def complete(self, request: CompletionRequest) -> Completion:
        timeout = self._timeout(request)
        started = time.perf_counter()
        try:
            async with asyncio.timeout(timeout):
                response = await self._client.post(
                    self._url, json=self.body(request, stream=False), timeout=timeout
                )
                if response.status_code >= 400:
                    raise status_error(response, response.text)
                payload = response.json()
        except (TimeoutError, httpx.TimeoutException):
            raise BackendUnavailable(f"{self._name}: no answer within {timeout:.2f}s") from None
        except httpx.TransportError as exc:
            raise BackendUnavailable(f"{self._name}: {type(exc).__name__}: {exc}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BackendUnavailable(f"{self._name}: malformed response body: {exc}") from None
        try:
            choice = payload["choices"][0]
            text = choice["message"]["content"] or ""
            usage = payload.get("usage") or {}
        except (KeyError, IndexError, TypeError) as exc:
            raise BackendUnavailable(f"{self._name}: unexpected response shape: {exc!r}") from None
        return Completion(
            text=text,
            usage=Usage(int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0))),
            model=self._model,
            revision=self._revision,
            adapter=request.adapter,
            finish_reason=choice.get("finish_reason"),
            structured=parse_structured(text) if request.json_schema is not None else None,
            latency_ms=(time.perf_counter() - started) * 1000,
            backend=self._name,
        )

    def stream(self, request: CompletionRequest) -> CompletionStream:
        return CompletionStream.of(lambda out: self._stream(request, out))

    async def _stream(
        self, request: CompletionRequest, out: CompletionStream
    ) -> AsyncIterator[str]:
        timeout = self._timeout(request)
        # An absolute deadline checked between events, with every network wait bounded by what
        # is left of it: `asyncio.timeout` cannot wrap a generator's yields safely.
        deadline = time.monotonic() + timeout
        parts: list[str] = []
        ttft_ms: float | None = None
        usage = Usage()
        finish: str | None = None
        try:
            async with self._client.stream(
                "POST", self._url, json=self.body(request, stream=True), timeout=timeout
            ) as response:
                if response.status_code >= 400:
                    body = (await response.aread()).decode(errors="replace")
                    raise status_error(response, body)
                lines = response.aiter_lines()
                done = False
                async for line in lines:
                    if time.monotonic() > deadline:
                        raise TimeoutError
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        done = True
                        break
                    event = json.loads(data)
                    if event.get("usage"):
                        u = event["usage"]
                        usage = Usage(
                            int(u.get("prompt_tokens", 0)), int(u.get("completion_tokens", 0))
                        )
                    for choice in event.get("choices") or []:
                        finish = choice.get("finish_reason") or finish
                        piece = (choice.get("delta") or {}).get("content") or ""
                        if piece:
                            if ttft_ms is None:
                                ttft_ms = (time.perf_counter() - out.started) * 1000
                            parts.append(piece)
                            yield piece
                ended = time.perf_counter()
                if done:
                    await _drain(lines, min(_DRAIN_S, deadline - time.monotonic()))
        except (TimeoutError, httpx.TimeoutException):
            raise BackendUnavailable(f"{self._name}: stream exceeded {timeout:.2f}s") from None
        except httpx.TransportError as exc:
            raise BackendUnavailable(f"{self._name}: {type(exc).__name__}: {exc}") from None
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, TypeError) as exc:
            raise BackendUnavailable(f"{self._name}: malformed stream event: {exc!r}") from None
        text = "".join(parts)
        out.result = Completion(
            text=text,
            usage=usage,
            model=self._model,
            revision=self._revision,
            adapter=request.adapter,
            finish_reason=finish,
            structured=parse_structured(text) if request.json_schema is not None else None,
            ttft_ms=ttft_ms,
            latency_ms=(ended - out.started) * 1000,
            backend=self._name,
        )
