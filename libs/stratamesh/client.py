"""The request-plane client: publish questions, receive their results.

    async with MeshClient(settings, "client:local") as client:
        result = await client.ask("How do I redrive the DLQ?", deadline_s=60)
        print(result.status, result.answer, [c.doc_id for c in result.citations])

Questions are signed ``InferenceRequested`` events on ``requests.submitted`` (the tenant is
the one registered to the client key).  One reader follows ``results`` from its end offsets
taken when the client starts (not a consumer group: every client sees every result and keeps
those of its own requests), verifies each result's signature and producer, and resolves the
request's future.  Many questions may be in flight at once (:meth:`submit`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

from aiokafka import TopicPartition

from stratamesh.bus import headers as H
from stratamesh.bus import topics as T
from stratamesh.bus.codec import Codec
from stratamesh.bus.envelope import now_ms
from stratamesh.bus.offsets import open_consumer, topic_partitions, true_end_offsets
from stratamesh.bus.publish import Publisher
from stratamesh.config import Settings
from stratamesh.errors import ConfigError, StrataError
from stratamesh.events import (
    InferenceRequested,
    Message,
    Priority,
    RequestCompleted,
    new_event_id,
)
from stratamesh.security.keys import Keyring
from stratamesh.security.signing import SignatureCache, leaf_hash, verify_record

__all__ = ["DEFAULT_DEADLINE_S", "MeshClient", "Pending"]

DEFAULT_DEADLINE_S: Final = 120.0
# How long past its deadline a request may stay unanswered before the client gives up: the
# stage holding it publishes `expired` at the deadline, so this only covers a dead mesh.
_GRACE_S: Final = 30.0


@dataclass(slots=True)
class Pending:
    """A question in flight."""

    request_id: str
    submitted_ms: int
    future: asyncio.Future[RequestCompleted]

    async def result(self, timeout_s: float | None = None) -> RequestCompleted:
        return await asyncio.wait_for(asyncio.shield(self.future), timeout_s)


class MeshClient:
    def __init__(self, settings: Settings, identity: str) -> None:
        if not identity.startswith("client:"):
            raise ConfigError(f"ask as a client identity (client:<name>), not {identity!r}")
        self.settings = settings
        self.identity = identity
        keyring = Keyring.load(settings.keys_dir)
        client = keyring.client(identity)
        if client is None:
            raise ConfigError(
                f"no client key {identity!r} in {settings.keys_dir}: create one with "
                f"`strata keys gen --client {identity.removeprefix('client:')} --tenant NAME`"
            )
        self.tenant = client.tenant
        self._keyring = keyring
        self._codec = Codec.from_settings(settings)
        self._sig_cache = SignatureCache()
        self._publisher = Publisher(settings, identity)
        self._pending: dict[str, Pending] = {}
        self._stack = contextlib.AsyncExitStack()
        self._reader: asyncio.Task[None] | None = None

    async def __aenter__(self) -> MeshClient:
        async with contextlib.AsyncExitStack() as stack:
            consumer = await stack.enter_async_context(open_consumer(self.settings))
            parts = await topic_partitions(consumer, T.RESULTS)
            tps = [TopicPartition(T.RESULTS, p) for p in parts]
            ends = await true_end_offsets(consumer, tps)  # before any question is sent
            consumer.assign(tps)
            for tp in tps:
                consumer.seek(tp, ends[tp])
            await stack.enter_async_context(self._publisher)
            self._stack = stack.pop_all()
        self._reader = asyncio.create_task(self._read(consumer), name="results-reader")
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
            self._reader = None
        await self._stack.aclose()
        for p in self._pending.values():
            if not p.future.done():
                p.future.cancel()

    def request(
        self,
        prompt: str,
        *,
        task: str = "qa",
        messages: Sequence[tuple[str, str]] = (),
        priority: Priority = Priority.PRO,
        deadline_s: float = DEFAULT_DEADLINE_S,
        response_format: str | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
        request_id: str | None = None,
        metadata: dict[str, str] | None = None,
    ) -> InferenceRequested:
        """The event :meth:`submit` publishes (exposed for tests and tools)."""
        return InferenceRequested(
            event_id=new_event_id(),
            tenant=self.tenant,
            occurred_at=datetime.now(UTC),
            producer=self.identity,
            request_id=request_id or new_event_id(),
            priority=priority,
            deadline_ms=now_ms() + int(deadline_s * 1000),
            unsigned_ingress=False,
            versions={},
            stage_latency_ms={},
            prompt=prompt,
            task=task,
            messages=[Message(role=r, content=c) for r, c in messages],
            response_format=response_format,
            max_tokens=max_tokens,
            temperature=temperature,
            client_metadata=metadata or {},
            principals=[],
            as_of=None,
        )

    async def submit(self, event: InferenceRequested) -> Pending:
        """Publish ``event`` (acknowledged by the broker); its result arrives on the future."""
        if self._reader is None:
            raise ConfigError("use the client as `async with MeshClient(...) as client`")
        future: asyncio.Future[RequestCompleted] = asyncio.get_running_loop().create_future()
        pending = Pending(event.request_id, now_ms(), future)
        self._pending[event.request_id] = pending
        try:
            await self._publisher.publish(event, deadline_ms=event.deadline_ms)
        except BaseException:
            self._pending.pop(event.request_id, None)
            raise
        return pending

    async def ask(self, prompt: str, **kw: Any) -> RequestCompleted:
        """Publish one question and wait for its result (at most its deadline plus a grace)."""
        event = self.request(prompt, **kw)
        pending = await self.submit(event)
        assert event.deadline_ms is not None
        wait_s = max(0.0, (event.deadline_ms - now_ms()) / 1000) + _GRACE_S
        try:
            return await pending.result(wait_s)
        except TimeoutError:
            raise StrataError(
                f"no result for request {event.request_id} within {wait_s:.0f} s: are the "
                "services running (`strata up`)? `strata tail results` shows what arrives"
            ) from None
        finally:
            self._pending.pop(event.request_id, None)

    async def _read(self, consumer: Any) -> None:
        while True:
            batch = await consumer.getmany(timeout_ms=200)
            for records in batch.values():
                for rec in records:
                    self._record(rec)

    def _record(self, rec: Any) -> None:
        headers = H.header_dict(rec.headers)
        request_id = headers.get(H.REQUEST_ID, b"").decode()
        pending = self._pending.get(request_id)
        if pending is None or pending.future.done():
            return
        producer = headers.get(H.PRODUCER, b"").decode()
        if not T.topic(T.RESULTS).allows(producer):
            return  # not a result any consumer would accept
        try:
            verify_record(
                self._keyring,
                producer,
                leaf_hash(rec.key, rec.value or b"", headers),
                headers.get(H.SIGNATURE),
                self._sig_cache,
            )
            event = self._codec.decode(rec.value)
        except StrataError:
            return  # forged or corrupt: the genuine result may still come
        if isinstance(event, RequestCompleted) and event.tenant == self.tenant:
            pending.future.set_result(event)
