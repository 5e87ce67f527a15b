"""What the embedded helper processes (broker, vLLM server) share: being context managers."""

from __future__ import annotations

import asyncio
from types import TracebackType
from typing import Self

__all__ = ["ManagedProcess"]


class ManagedProcess:
    """``start()`` / ``stop()`` as a context manager, sync or async (start and stop block, so
    the async form runs them in a thread)."""

    def start(self) -> str:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        await asyncio.to_thread(self.start)
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await asyncio.to_thread(self.stop)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
