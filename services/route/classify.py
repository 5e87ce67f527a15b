"""What route classifies, and with what.

The text is the (pseudonymised) prompt, else the last user message.  The default classifier
is the packaged intent artifact over the bundled MiniLM (:mod:`stratamesh.models.intent`),
loaded lazily in a worker thread; its vectors also key the semantic cache.  Anything with
the :class:`RequestClassifier` shape can replace it (tests, another model).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Protocol

from stratamesh.events import RequestAdmitted
from stratamesh.models.embedders import LocalEmbedder, Vectors
from stratamesh.models.intent import Classification, IntentClassifier, IntentModel

__all__ = ["LazyIntentClassifier", "RequestClassifier", "request_text"]


class RequestClassifier(Protocol):
    @property
    def version(self) -> str: ...

    async def classify(self, texts: Sequence[str]) -> tuple[Vectors, list[Classification]]: ...


def request_text(event: RequestAdmitted) -> str:
    if event.query.prompt.strip():
        return event.query.prompt
    users = [m.content for m in event.query.messages if m.role == "user"]
    return users[-1] if users else ""


class LazyIntentClassifier:
    """The packaged classifier, loaded on first use (or by :meth:`warm`)."""

    def __init__(self) -> None:
        self._inner: IntentClassifier | None = None
        self._lock = asyncio.Lock()

    async def warm(self) -> IntentClassifier:
        async with self._lock:
            if self._inner is None:
                model = await asyncio.to_thread(IntentModel.load)
                embedder = LocalEmbedder.shared()
                await asyncio.to_thread(embedder.load)
                self._inner = IntentClassifier(model, embedder)
            return self._inner

    @property
    def version(self) -> str:
        return self._inner.version if self._inner is not None else "intent@unloaded"

    async def classify(self, texts: Sequence[str]) -> tuple[Vectors, list[Classification]]:
        inner = await self.warm()
        return await inner.classify(texts)
