"""Lifecycle hooks of a Service: bind on every pipeline build, start/stop around the runtime."""

from __future__ import annotations

import pytest

from stratamesh.bus.service import Service
from stratamesh.bus.testing import MemoryMesh
from stratamesh.bus.topics import DOCS_SUBMITTED
from stratamesh.config import Settings
from stratamesh.events import DocumentSubmitted


def test_bind_hook_runs_when_the_memory_mesh_builds_the_pipeline() -> None:
    svc = Service("ingest")
    seen: list[Settings] = []

    @svc.subscribe(DOCS_SUBMITTED)
    async def handle(event: DocumentSubmitted, ctx: object) -> None:
        return None

    svc.on_bind(seen.append)
    settings = Settings(client_id="hooks")
    MemoryMesh(svc, settings=settings)
    assert seen == [settings]


def test_variant_keeps_the_hooks_of_its_original() -> None:
    svc = Service("embed")
    calls: list[str] = []

    @svc.subscribe(DOCS_SUBMITTED)
    async def handle(event: DocumentSubmitted, ctx: object) -> None:
        return None

    @svc.on_start
    async def warm(settings: Settings) -> None:
        calls.append("start")

    @svc.on_stop
    async def close() -> None:
        calls.append("stop")

    svc.on_bind(lambda s: calls.append("bind"))
    other = svc.variant(identity="embed.r2", group="embed.r2")
    MemoryMesh(other)
    assert calls == ["bind"]
    assert other._start_hooks == svc._start_hooks and other._stop_hooks == svc._stop_hooks


def test_a_replica_is_its_own_identity_and_group_with_the_same_handlers() -> None:
    svc = Service("infer")

    @svc.subscribe(DOCS_SUBMITTED, stage="infer")
    async def handle(event: DocumentSubmitted, ctx: object) -> None:
        return None

    r3 = svc.replica(3)
    assert (r3.name, r3.identity, r3.group) == ("infer", "infer.r3", "infer.r3")
    assert r3.subscriptions[DOCS_SUBMITTED].handler is handle
    assert r3.subscriptions[DOCS_SUBMITTED].stage == "infer"
    with pytest.raises(ValueError):
        svc.replica(1)
