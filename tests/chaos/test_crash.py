"""Crash test: SIGKILL a consumer in the middle of 2,000 events, restart it.

Every input must produce its output, and the downstream effect of each output must happen
exactly once, although the worker re-handles whatever it had not committed.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from stratamesh.bus import topics as T
from stratamesh.bus.admin import ensure_topics
from stratamesh.bus.middleware import Context
from stratamesh.bus.publish import Publisher
from stratamesh.bus.service import Service
from stratamesh.config import Settings
from stratamesh.events import RequestAdmitted, derived_event_id
from stratamesh.events.testing import sample_event
from stratamesh.security.keys import generate_identity

ROOT = Path(__file__).resolve().parents[2]
N = 2000


def _spawn(settings: Settings) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "STRATA_HOME": str(settings.home),
        "STRATA_BOOTSTRAP_SERVERS": settings.bootstrap_servers or "",
        "STRATA_CONSUMER__SESSION_TIMEOUT_MS": "6000",
        "STRATA_CONSUMER__HEARTBEAT_INTERVAL_MS": "500",
        "STRATA_LOG_LEVEL": "WARNING",
    }
    if settings.redis_url:
        env["STRATA_REDIS_URL"] = settings.redis_url
    return subprocess.Popen(
        [sys.executable, "-m", "tests.chaos.worker"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )


@pytest.mark.slow
async def test_sigkill_mid_stream_loses_nothing_and_duplicates_no_effect(
    settings: Settings,
) -> None:
    await ensure_topics(settings, partitions=3)
    for identity in ("guard", "route", "infer"):
        generate_identity(settings.keys_dir, identity)
    effects: list[str] = []

    async def sink(event: Any, ctx: Context) -> None:
        effects.append(event.event_id)  # the downstream effect: must happen once per output

    downstream = Service("infer")
    downstream.subscribe(T.REQUESTS_ROUTED)(sink)
    await downstream.start(settings)

    inputs = [sample_event(RequestAdmitted, request_id=f"req-{i}") for i in range(N)]
    async with Publisher(settings, "guard") as pub:
        for ev in inputs:
            pub.producer.send(pub.record(ev))
        await pub.producer.flush()

    worker = _spawn(settings)
    try:
        deadline = time.monotonic() + 60
        while len(effects) < N * 0.3:
            assert time.monotonic() < deadline, "worker made no progress"
            assert worker.poll() is None, "worker died on its own"
            await asyncio.sleep(0.02)
        worker.send_signal(signal.SIGKILL)
        worker.wait(10)
        killed_at = len(effects)
        assert killed_at < N, "the stream finished before the kill: slow the worker down"
        worker = _spawn(settings)
        deadline = time.monotonic() + 120
        while len(set(effects)) < N:
            assert time.monotonic() < deadline, f"only {len(set(effects))} of {N} outputs"
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.0)  # let any late duplicate arrive before judging
    finally:
        if worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(15)
            except subprocess.TimeoutExpired:
                worker.kill()
        await downstream.stop()

    expected = {derived_event_id(ev.event_id, "route", 0) for ev in inputs}
    assert set(effects) == expected  # nothing lost
    assert len(effects) == N  # no effect twice
    physical = await _count(settings, T.REQUESTS_ROUTED)
    assert physical >= N
    print(
        f"killed after {killed_at} effects; {physical} output records on the topic "
        f"({physical - N} re-sent after the crash); {len(effects)} effects, all distinct"
    )


async def _count(settings: Settings, topic_name: str) -> int:
    from aiokafka import TopicPartition

    from stratamesh.bus.offsets import offset_bounds

    tps = [TopicPartition(topic_name, p) for p in range(3)]
    bounds = await offset_bounds(settings, tps)
    return sum(b.count for b in bounds.values())
