"""A stratamesh service: a name, its subscriptions, and the machinery that runs them.

Every service has the same shape (``services/<name>/app.py``)::

    service = Service("ingest")

    @service.subscribe(topics.DOCS_SUBMITTED)
    async def on_submitted(event: DocumentSubmitted, ctx: Context) -> None:
        ctx.publish(DocumentChunked(event_id=ctx.derive_id(), ...))

``await service.start(settings)`` joins the consumer group ``service.group`` and runs every
record through the one middleware (:mod:`stratamesh.bus.middleware`).

A service that owns resources (a model, a store) registers lifecycle hooks instead of
subclassing::

    @service.on_bind          # settings known: open clients lazily (also in MemoryMesh)
    def bind(settings: Settings) -> None: ...

    @service.on_start         # before partitions are taken: load models, warm caches
    async def warm(settings: Settings) -> None: ...

    @service.on_stop          # after the consumer stopped: close what was opened
    async def close() -> None: ...
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

import structlog

from stratamesh.bus.codec import Codec
from stratamesh.bus.middleware import Handler, Pipeline, Subscription
from stratamesh.bus.producer import MeshProducer
from stratamesh.bus.runtime import KafkaRuntime
from stratamesh.bus.topics import SHADOW_PREFIX, topic
from stratamesh.config import Settings
from stratamesh.errors import ConfigError
from stratamesh.obs.metrics import bus_metrics
from stratamesh.obs.otel import handler_tracer
from stratamesh.resilience.retry import Backoff, RetryBudget
from stratamesh.security.keys import Keyring, SigningKey, load_signing_key
from stratamesh.stores.idempotency import IdempotencyStore, open_idempotency

__all__ = ["Service"]

log = structlog.get_logger("stratamesh.bus")

H_ = TypeVar("H_", bound=Handler)
BindHook = Callable[[Settings], None]
StartHook = Callable[[Settings], Awaitable[None]]
StopHook = Callable[[], Awaitable[None]]
B_ = TypeVar("B_", bound=BindHook)
S_ = TypeVar("S_", bound=StartHook)
T_ = TypeVar("T_", bound=StopHook)


class Service:
    def __init__(
        self,
        name: str,
        *,
        identity: str | None = None,
        group: str | None = None,
        shadow: bool = False,
    ) -> None:
        self.name = name
        self.identity = identity or name
        self.namespace = SHADOW_PREFIX if shadow else ""
        self.group = group or f"{self.namespace}{self.identity}"
        self.subscriptions: dict[str, Subscription] = {}
        self.pipeline: Pipeline | None = None
        self.runtime: KafkaRuntime | None = None
        self.producer: MeshProducer | None = None
        self._bind_hooks: list[BindHook] = []
        self._start_hooks: list[StartHook] = []
        self._stop_hooks: list[StopHook] = []

    def on_bind(self, hook: B_) -> B_:
        """Run ``hook(settings)`` whenever a pipeline is built (real runtime or MemoryMesh)."""
        self._bind_hooks.append(hook)
        return hook

    def on_start(self, hook: S_) -> S_:
        """Await ``hook(settings)`` in :meth:`start`, before the consumer joins its group."""
        self._start_hooks.append(hook)
        return hook

    def on_stop(self, hook: T_) -> T_:
        """Await ``hook()`` in :meth:`stop`, after the consumer and producer stopped."""
        self._stop_hooks.append(hook)
        return hook

    def subscribe(
        self,
        topic_name: str,
        *,
        stage: str | None = None,
        batch_size: int = 1,
        batch_wait_ms: int = 0,
    ) -> Callable[[H_], H_]:
        """Register the handler of ``topic_name``.

        With ``stage``, only records whose ``strata-next`` header names that stage (or that
        carry none) reach it.  With ``batch_size`` > 1 the handler receives a list of
        ``(event, ctx)`` pairs of one partition (see :class:`Subscription`).
        """
        if batch_size < 1 or batch_wait_ms < 0:
            raise ConfigError("batch_size must be ≥ 1 and batch_wait_ms ≥ 0")
        topic(topic_name)  # fail fast on a typo

        def register(handler: H_) -> H_:
            name = self.namespace + topic_name
            if name in self.subscriptions:
                raise ConfigError(f"{self.name} subscribes to {name} twice")
            self.subscriptions[name] = Subscription(name, handler, stage, batch_size, batch_wait_ms)
            return handler

        return register

    def variant(
        self, *, identity: str | None = None, group: str | None = None, shadow: bool = False
    ) -> Service:
        """The same handlers under another identity, consumer group or namespace (e.g. a
        replica ``infer.r2``, a re-index group ``embed@model``, a shadow pipeline)."""
        other = Service(self.name, identity=identity or self.identity, group=group, shadow=shadow)
        for sub in self.subscriptions.values():
            base = sub.topic.removeprefix(self.namespace)
            other.subscribe(
                base, stage=sub.stage, batch_size=sub.batch_size, batch_wait_ms=sub.batch_wait_ms
            )(sub.handler)
        other._bind_hooks = list(self._bind_hooks)
        other._start_hooks = list(self._start_hooks)
        other._stop_hooks = list(self._stop_hooks)
        return other

    def replica(self, k: int) -> Service:
        """Replica ``k`` (≥ 2): identity and consumer group ``<identity>.r<k>``, so every
        replica sees every record and signs with its own key (replica 1 is ``self``)."""
        if k < 2:
            raise ValueError("replica 1 is the service itself")
        return self.variant(identity=f"{self.identity}.r{k}", group=f"{self.identity}.r{k}")

    @property
    def topics(self) -> list[str]:
        return sorted(self.subscriptions)

    def build_pipeline(
        self,
        settings: Settings,
        *,
        keyring: Keyring | None = None,
        idempotency: IdempotencyStore | None = None,
        codec: Codec | None = None,
    ) -> Pipeline:
        for hook in self._bind_hooks:
            hook(settings)
        return Pipeline(
            service=self.identity,
            group=self.group,
            subscriptions=dict(self.subscriptions),
            keyring=keyring or Keyring.load(settings.keys_dir),
            codec=codec or Codec.from_settings(settings),
            idempotency=idempotency or open_idempotency(settings, self.group),
            metrics=bus_metrics(),
            attempts=settings.retry.attempts,
            backoff=Backoff.from_settings(settings.retry),
            budget=RetryBudget.from_settings(settings.retry),
            allow_unsigned_ingress=settings.security.allow_unsigned_ingress,
            namespace=self.namespace,
            tracer=handler_tracer(settings, self.namespace + self.identity),
        )

    async def start(
        self,
        settings: Settings,
        *,
        keyring: Keyring | None = None,
        signing_key: SigningKey | None = None,
        idempotency: IdempotencyStore | None = None,
    ) -> None:
        if not self.subscriptions:
            raise ConfigError(f"service {self.name} has no subscriptions")
        key = signing_key or load_signing_key(settings, self.identity)
        for hook in self._start_hooks:
            await hook(settings)
        self.pipeline = self.build_pipeline(settings, keyring=keyring, idempotency=idempotency)
        self.producer = MeshProducer(settings, key, service=self.identity)
        await self.producer.start()
        self.runtime = KafkaRuntime(settings, self.pipeline, self.producer, self.topics)
        try:
            await self.runtime.start()
        except BaseException:
            await self.producer.stop()
            raise
        log.info("service started", service=self.identity, group=self.group, topics=self.topics)

    async def wait(self) -> None:
        if self.runtime is not None:
            await self.runtime.wait()

    async def stop(self) -> None:
        if self.runtime is not None:
            await self.runtime.stop()
        if self.producer is not None:
            await self.producer.stop()
        if self.pipeline is not None:
            await self.pipeline.idempotency.close()
            if self.pipeline.tracer is not None:
                # The exporter posts from its own thread: don't hold the event loop for it.
                await asyncio.to_thread(self.pipeline.tracer.flush)
        self.runtime = self.producer = self.pipeline = None
        for hook in self._stop_hooks:
            await hook()
        log.info("service stopped", service=self.identity)
