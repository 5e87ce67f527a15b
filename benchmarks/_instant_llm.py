"""An OpenAI-compatible chat server that answers every completion at once (for benchmarks).

The mesh benchmark uses it as infer's backend so that the mesh itself is measured at request
rates no model on a small machine reaches.  It runs as its own process on loopback (so its
work does not share the benchmark's event loop) and speaks just enough HTTP/1.1: keep-alive,
``Content-Length`` framing, ``POST /v1/chat/completions`` (plain and ``stream: true``) and
``GET /v1/models``.  The answer is one fixed sentence; when the prompt carries numbered
passages (``[1] ...``) it cites ``[1]``, as a grounded model would, so guard's citation
check sees a well-formed answer.

    python benchmarks/_instant_llm.py [--port 0]     # prints the base URL, serves until killed
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import subprocess
import sys
import time
import uuid
from typing import Any

__all__ = ["SERVED_MODEL", "InstantLLM", "completion"]

SERVED_MODEL = "instant"
CITED = "The handbook describes this procedure step by step [1]."
PLAIN = "The handbook describes this procedure step by step."


def completion(body: dict[str, Any]) -> dict[str, Any]:
    """The chat.completion answer to ``body`` (an OpenAI chat request)."""
    messages = body.get("messages") or []
    last = str(messages[-1].get("content", "")) if messages else ""
    text = CITED if "[1]" in last else PLAIN
    prompt_tokens = max(1, sum(len(str(m.get("content", ""))) for m in messages) // 4)
    completion_tokens = len(text.split())
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body.get("model") or SERVED_MODEL,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": "stop",
            }
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


def _sse(answer: dict[str, Any]) -> bytes:
    """The same answer as server-sent events: one content delta, then usage, then [DONE]."""
    base = {k: answer[k] for k in ("id", "created", "model")}
    text = answer["choices"][0]["message"]["content"]
    events = [
        {
            **base,
            "object": "chat.completion.chunk",
            "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": "stop"}],
        },
        {**base, "object": "chat.completion.chunk", "choices": [], "usage": answer["usage"]},
    ]
    lines = [f"data: {json.dumps(e)}\n\n" for e in events] + ["data: [DONE]\n\n"]
    return "".join(lines).encode()


async def _serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
            method, path = head[0].split(" ")[:2]
            fields = {
                k.strip().lower(): v.strip()
                for k, v in (x.split(":", 1) for x in head[1:] if ":" in x)
            }
            raw = await reader.readexactly(int(fields.get("content-length", "0")))
            status, ctype = "200 OK", "application/json"
            if method == "POST" and path.rstrip("/").endswith("/chat/completions"):
                body = json.loads(raw) if raw else {}
                answer = completion(body)
                if body.get("stream"):
                    data, ctype = _sse(answer), "text/event-stream"
                else:
                    data = json.dumps(answer).encode()
            elif method == "GET" and path.rstrip("/").endswith("/models"):
                data = json.dumps(
                    {"object": "list", "data": [{"id": SERVED_MODEL, "object": "model"}]}
                ).encode()
            else:
                status, data = "404 Not Found", b'{"error": "not found"}'
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(data)}\r\n\r\n".encode()
                + data
            )
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError, ValueError):
        pass
    finally:
        writer.close()


async def serve(port: int) -> None:
    server = await asyncio.start_server(_serve, "127.0.0.1", port)
    host, bound = server.sockets[0].getsockname()[:2]
    print(f"http://{host}:{bound}", flush=True)
    async with server:
        await server.serve_forever()


class InstantLLM:
    """The server as a child process: ``with InstantLLM() as url: ...``."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen[str] | None = None
        self.url = ""

    def __enter__(self) -> str:
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--port", "0"], stdout=subprocess.PIPE, text=True
        )
        assert self.proc.stdout is not None
        self.url = self.proc.stdout.readline().strip()
        if not self.url.startswith("http://"):
            self.__exit__()
            raise RuntimeError("the instant LLM server did not start")
        return self.url

    def __exit__(self, *exc: object) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.proc = None


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.port))


if __name__ == "__main__":
    main()
