"""Shared fixtures: the real embedded broker, and Redis / Postgres when their URLs are set."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from stratamesh.config import Settings
from stratamesh.embedded import EmbeddedBroker


@pytest.fixture
def broker() -> Iterator[EmbeddedBroker]:
    """A fresh real Tansu broker per test (memory storage, free port; starts in ~30 ms)."""
    with EmbeddedBroker() as b:
        yield b


@pytest.fixture
def unique() -> str:
    """A short unique suffix so tests never share topics, groups or keys."""
    return uuid.uuid4().hex[:10]


@pytest.fixture
def settings(broker: EmbeddedBroker, tmp_path: Path) -> Settings:
    """Settings pointing at the session broker, with a private home folder per test.

    Redis is used only when STRATA_REDIS_URL is set (CI sets it); otherwise the local store.
    """
    return Settings(
        home=tmp_path / "home",
        bootstrap_servers=broker.bootstrap,
        redis_url=os.environ.get("STRATA_REDIS_URL"),
        database_url=os.environ.get("STRATA_DATABASE_URL"),
        consumer={"session_timeout_ms": 6000, "heartbeat_interval_ms": 500},  # type: ignore[arg-type]
    )
