"""The OpenAI-compatible backend's request bodies, SSE parsing, TTFT and error mapping,
against an in-process httpx transport (the real server is tests/integration/test_vllm.py)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from stratamesh.errors import Poison
from stratamesh.models.llm.base import (
    BackendUnavailable,
    ChatMessage,
    CompletionRequest,
    InvalidOutput,
    RateLimited,
    Sampling,
)
from stratamesh.models.llm.openai_http import OpenAIChatBackend

REQUEST = CompletionRequest(
    [ChatMessage("system", "sys"), ChatMessage("user", "hi")],
    Sampling(temperature=0.0, max_tokens=16, seed=7, stop=("\n\n",)),
)


def backend(handler: Any, **kw: Any) -> OpenAIChatBackend:
    client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    return OpenAIChatBackend("http://srv/v1", "served", client=client, revision="r1", **kw)


def completion_body(text: str) -> dict[str, Any]:
    return {
        "choices": [{"message": {"content": text}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 11, "completion_tokens": 3},
    }


async def test_complete_sends_sampling_schema_and_adapter_and_reads_usage() -> None:
    seen: list[dict[str, Any]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/v1/chat/completions"
        seen.append(json.loads(request.content))
        return httpx.Response(200, json=completion_body('{"a": 1}'))

    llm = backend(handler, adapters={"legal@2": "legal-lora"})
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    req = CompletionRequest(REQUEST.messages, REQUEST.sampling, schema, "legal@2")
    done = await llm.complete(req)
    body = seen[0]
    assert body["model"] == "legal-lora"
    assert body["seed"] == 7 and body["max_tokens"] == 16 and body["stop"] == ["\n\n"]
    assert body["response_format"]["type"] == "json_schema"
    assert body["response_format"]["json_schema"]["schema"] == schema
    assert done.structured == {"a": 1} and done.usage.prompt_tokens == 11
    assert done.adapter == "legal@2" and done.revision == "r1" and done.model == "served"


async def test_unknown_adapter_name_passes_through_and_no_adapter_uses_served_model() -> None:
    llm = backend(lambda r: httpx.Response(200, json=completion_body("x")))
    assert llm.served_name(None) == "served"
    assert llm.served_name("other@1") == "other@1"


def sse(events: list[dict[str, Any]]) -> bytes:
    return b"".join(f"data: {json.dumps(e)}\n\n".encode() for e in events) + b"data: [DONE]\n\n"


async def test_stream_yields_pieces_measures_ttft_and_reads_final_usage() -> None:
    events = [
        {"choices": [{"delta": {"role": "assistant"}}]},
        {"choices": [{"delta": {"content": "Par"}}]},
        {"choices": [{"delta": {"content": "is [1]"}, "finish_reason": "stop"}]},
        {"choices": [], "usage": {"prompt_tokens": 20, "completion_tokens": 4}},
    ]
    seen: list[dict[str, Any]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(json.loads(request.content))
        return httpx.Response(
            200, content=sse(events), headers={"content-type": "text/event-stream"}
        )

    stream = backend(handler).stream(REQUEST)
    pieces = [p async for p in stream]
    assert pieces == ["Par", "is [1]"]
    assert seen[0]["stream"] is True and seen[0]["stream_options"] == {"include_usage": True}
    done = stream.result
    assert done is not None and done.text == "Paris [1]"
    assert done.usage.completion_tokens == 4 and done.finish_reason == "stop"
    assert done.ttft_ms is not None and 0 <= done.ttft_ms <= done.latency_ms


@pytest.mark.parametrize(
    ("status", "headers", "error"),
    [
        (429, {"retry-after": "3"}, RateLimited),
        (503, {"retry-after": "1"}, RateLimited),
        (503, {}, BackendUnavailable),
        (500, {}, BackendUnavailable),
        (408, {}, BackendUnavailable),
        (400, {}, Poison),
        (404, {}, Poison),
    ],
)
async def test_http_errors_map_onto_the_taxonomy(
    status: int, headers: dict[str, str], error: type[Exception]
) -> None:
    llm = backend(lambda r: httpx.Response(status, headers=headers, text="nope"))
    with pytest.raises(error) as info:
        await llm.complete(REQUEST)
    if error is RateLimited:
        assert info.value.retry_after == float(headers["retry-after"])  # type: ignore[attr-defined]
    with pytest.raises(error):
        await llm.stream(REQUEST).collect()


async def test_connection_errors_and_malformed_bodies_are_unavailable() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    with pytest.raises(BackendUnavailable):
        await backend(refuse).complete(REQUEST)
    with pytest.raises(BackendUnavailable):
        await backend(lambda r: httpx.Response(200, text="<html>")).complete(REQUEST)
    with pytest.raises(BackendUnavailable):
        await backend(lambda r: httpx.Response(200, json={"choices": []})).complete(REQUEST)
    bad_sse = b"data: {not json\n\n"
    with pytest.raises(BackendUnavailable):
        await backend(lambda r: httpx.Response(200, content=bad_sse)).stream(REQUEST).collect()


async def test_structured_output_that_is_not_json_is_invalid_output() -> None:
    llm = backend(lambda r: httpx.Response(200, json=completion_body("not json")))
    req = CompletionRequest(REQUEST.messages, REQUEST.sampling, {"type": "object"})
    with pytest.raises(InvalidOutput):
        await llm.complete(req)


async def test_a_hanging_server_is_cut_at_the_request_timeout() -> None:
    async def hang(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(10)
        return httpx.Response(200, json=completion_body("late"))

    llm = backend(hang)
    req = CompletionRequest(REQUEST.messages, REQUEST.sampling, timeout_s=0.2)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(BackendUnavailable, match="no answer within"):
        await llm.complete(req)
    assert loop.time() - started < 2


async def test_a_stream_that_trickles_past_the_deadline_is_cut() -> None:
    async def trickle() -> AsyncIterator[bytes]:
        for i in range(50):
            yield f'data: {{"choices": [{{"delta": {{"content": "t{i}"}}}}]}}\n\n'.encode()
            await asyncio.sleep(0.05)

    llm = backend(lambda r: httpx.Response(200, content=trickle()))
    req = CompletionRequest(REQUEST.messages, REQUEST.sampling, timeout_s=0.3)
    pieces: list[str] = []
    with pytest.raises(BackendUnavailable, match="stream exceeded"):
        async for piece in llm.stream(req):
            pieces.append(piece)
    assert 0 < len(pieces) < 50


async def test_no_time_left_fails_without_a_call() -> None:
    calls = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        return httpx.Response(200, json=completion_body("x"))

    req = CompletionRequest(REQUEST.messages, REQUEST.sampling, timeout_s=0.0)
    with pytest.raises(BackendUnavailable):
        await backend(handler).complete(req)
    assert calls == 0


class ChunkedSSEServer:
    """A real loopback server answering every request with a chunked SSE stream (as vLLM
    does); ``hold`` keeps each body open after ``[DONE]``.  Counts connections."""

    def __init__(self, *, hold: bool = False) -> None:
        self.hold = hold
        self.connections = 0
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> str:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        host, port = self._server.sockets[0].getsockname()[:2]
        return f"http://{host}:{port}"

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
                length = next(
                    int(line.split(":", 1)[1])
                    for line in head.split("\r\n")
                    if line.lower().startswith("content-length:")
                )
                await reader.readexactly(length)
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                    b"Transfer-Encoding: chunked\r\n\r\n"
                )
                body = sse([{"choices": [{"delta": {"content": "ok"}, "finish_reason": "stop"}]}])
                writer.write(f"{len(body):x}\r\n".encode() + body + b"\r\n")
                await writer.drain()
                if self.hold:
                    await asyncio.sleep(30)
                writer.write(b"0\r\n\r\n")  # the closing chunk, after [DONE]
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


async def test_streamed_calls_reuse_one_connection() -> None:
    server = ChunkedSSEServer()
    async with server as url:
        llm = OpenAIChatBackend(url, "served")
        for _ in range(3):
            assert (await llm.stream(REQUEST).collect()).text == "ok"
        await llm.close()
    assert server.connections == 1


async def test_a_body_held_open_after_done_costs_its_connection_not_the_answer() -> None:
    server = ChunkedSSEServer(hold=True)
    async with server as url:
        llm = OpenAIChatBackend(url, "served")
        loop = asyncio.get_running_loop()
        started = loop.time()
        done = await llm.stream(REQUEST).collect()
        assert done.text == "ok" and loop.time() - started < 2
        assert done.latency_ms < 500  # measured at [DONE], not after the wait for the body
        await llm.close()
