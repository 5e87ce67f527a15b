"""Fixtures for tests against the real embedded broker: keys, topics, services, a raw producer."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer

from stratamesh.bus.admin import ensure_topics
from stratamesh.bus.publish import Publisher
from stratamesh.bus.service import Service
from stratamesh.config import Settings
from stratamesh.security.keys import generate_identity, register_client


@dataclass
class Env:
    settings: Settings
    services: list[Service] = field(default_factory=list)
    publishers: list[Publisher] = field(default_factory=list)

    def identity(self, *names: str) -> None:
        for name in names:
            if not (self.settings.keys_dir / f"{name}.key").exists():
                generate_identity(self.settings.keys_dir, name)

    def client(self, name: str, tenant: str) -> str:
        register_client(self.settings.keys_dir, name, tenant)
        return f"client:{name}"

    async def publisher(self, identity: str, **kw: object) -> Publisher:
        if not identity.startswith("client:") and not kw.get("unsigned"):
            self.identity(identity)
        pub = Publisher(self.settings, identity, **kw)  # type: ignore[arg-type]
        await pub.__aenter__()
        self.publishers.append(pub)
        return pub

    async def start(self, service: Service, settings: Settings | None = None) -> Service:
        self.identity(service.identity)
        await service.start(settings or self.settings)
        self.services.append(service)
        assert service.runtime is not None
        return service


@pytest.fixture
async def env(settings: Settings) -> AsyncIterator[Env]:
    await ensure_topics(settings, partitions=3)
    e = Env(settings)
    yield e
    for svc in e.services:
        await svc.stop()
    for pub in e.publishers:
        await pub.__aexit__(None, None, None)


@pytest.fixture
def producer_options() -> dict[str, Any]:
    """Extra ``AIOKafkaProducer`` options for ``producer``: a test module overrides this."""
    return {}


@pytest.fixture
async def producer(
    settings: Settings, producer_options: dict[str, Any]
) -> AsyncIterator[AIOKafkaProducer]:
    """A raw producer on the broker (no signing, no envelope), for writing records as-is."""
    p = AIOKafkaProducer(
        bootstrap_servers=settings.bootstrap_servers,
        acks="all",
        enable_idempotence=False,
        **producer_options,
    )
    await p.start()
    yield p
    await p.stop()


Waiter = Callable[..., object]
