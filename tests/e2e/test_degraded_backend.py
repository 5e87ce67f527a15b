"""A failing model backend end to end: infer's primary is an OpenAI-compatible server that
answers every call with HTTP 500 (a real server on a real socket); the breaker opens, the
reduced tier (the real local SmolLM2) serves, and every result says it was degraded.

guard, route and infer run in-process on the real embedded broker; route's policy asks for
no retrieval, so the slip is [infer, guard_out].
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from stratamesh.bus.admin import ensure_topics
from stratamesh.client import MeshClient
from stratamesh.config import InferSettings, RouteSettings, Settings
from stratamesh.embedded import EmbeddedBroker
from stratamesh.embedded.up import Mesh
from stratamesh.events import CompletionStatus
from stratamesh.security.keys import register_client
from tests.httpserver import JsonServer

POLICY = Path(__file__).resolve().parents[2] / "services" / "route" / "policy.toml"


def no_retrieval_policy(folder: Path) -> Path:
    """The packaged policy with every retrieval plan (defaults and rules) set to none."""
    text, n = re.subn(r'^(retrieval = )"\w+"', r'\1"none"', POLICY.read_text(), flags=re.M)
    assert n >= 2, "the packaged policy changed shape"
    path = folder / "policy.toml"
    path.write_text(text)
    return path


@pytest.fixture
async def failing_primary() -> AsyncIterator[JsonServer]:
    async with JsonServer(lambda path, body: (500, {"error": "CUDA error: device lost"})) as s:
        yield s


async def test_a_failing_backend_trips_the_breaker_and_the_reduced_tier_serves_marked_degraded(
    tmp_path: Path, failing_primary: JsonServer
) -> None:
    suffix = uuid.uuid4().hex[:8]
    with EmbeddedBroker() as broker:
        settings = Settings(
            home=tmp_path / "home",
            bootstrap_servers=broker.bootstrap,
            redis_url=os.environ.get("STRATA_REDIS_URL"),
            consumer={"session_timeout_ms": 6000, "heartbeat_interval_ms": 500},  # type: ignore[arg-type]
            route=RouteSettings(
                policy_file=no_retrieval_policy(tmp_path),
                cache_enabled=False,
                enabled_stages=["infer", "guard_out"],  # the stages this test runs
            ),
            infer=InferSettings(
                backend="openai",
                endpoint=failing_primary.url,
                served_model="primary",
                chain=["openai"],
                reduced_backend="local",
                max_tokens=24,
            ),
        )
        await ensure_topics(settings, partitions=3)
        register_client(settings.keys_dir, f"acme-{suffix}", f"acme-{suffix}")
        mesh = await Mesh.start(settings, only=["guard", "route", "infer"])
        results: list[Any] = []
        calls: list[int] = []
        try:
            async with MeshClient(mesh.settings, f"client:acme-{suffix}") as client:
                for i in range(5):
                    results.append(
                        await client.ask(f"Name a colour of the rainbow (#{i}).", deadline_s=90)
                    )
                    calls.append(len(failing_primary.requests))
        finally:
            await mesh.stop()
    assert all(r.status == CompletionStatus.OK for r in results), [r.reason for r in results]
    assert all(r.answer and r.degradation in ("reduced", "extractive") for r in results)
    assert all(
        r.slip is not None and [s.stage for s in r.slip.stages] == ["infer", "guard_out"]
        for r in results
    )
    assert calls[0] >= 1, "the primary was tried first"
    # Once the breaker is open (and the tier stepped down) the dead primary gets no calls.
    assert calls[-1] == calls[2], calls
    assert all(p == "/v1/chat/completions" for p, _ in failing_primary.requests)
