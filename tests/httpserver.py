"""A tiny real HTTP/1.1 JSON server on 127.0.0.1 for tests of remote-model clients.

``JsonServer(respond)`` answers each POST with ``respond(path, body)`` → ``(status,
payload)``; ``server.mode = "hang"`` holds requests open until the server closes (a hung
model server).  Real sockets, keep-alive and Content-Length framing, so the clients' httpx
stacks, timeouts and breakers are exercised as against a real server.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

__all__ = ["JsonServer", "Respond"]

Respond = Callable[[str, Any], tuple[int, Any]]

_REASONS = {200: "OK", 400: "Bad Request", 422: "Unprocessable Entity", 429: "Too Many Requests"}


class JsonServer:
    def __init__(self, respond: Respond) -> None:
        self.respond = respond
        self.mode = "ok"  # "ok" | "hang"
        self.requests: list[tuple[str, Any]] = []  # (path, body)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._release = asyncio.Event()

    async def __aenter__(self) -> JsonServer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._release.set()
        assert self._server is not None
        self._server.close()
        for w in list(self._writers):
            w.close()
        await self._server.wait_closed()

    @property
    def url(self) -> str:
        assert self._server is not None
        host, port = self._server.sockets[0].getsockname()[:2]
        return f"http://{host}:{port}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while True:
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
                path = head[0].split(" ")[1]
                fields = {
                    k.strip().lower(): v.strip()
                    for k, v in (x.split(":", 1) for x in head[1:] if ":" in x)
                }
                raw = await reader.readexactly(int(fields.get("content-length", "0")))
                body = json.loads(raw) if raw else None
                self.requests.append((path, body))
                if self.mode == "hang":
                    await self._release.wait()
                    return
                status, payload = self.respond(path, body)
                data = json.dumps(payload).encode()
                reason = _REASONS.get(status, "Server Error" if status >= 500 else "Status")
                writer.write(
                    f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {len(data)}\r\n\r\n".encode()
                    + data
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()
