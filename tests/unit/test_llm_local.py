"""The local backend's plumbing around its runtime (a scripted one here; the real model runs in
tests/integration/test_infer.py): streaming, TTFT, deadlines, its own overload, failures."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from stratamesh.models.llm.base import (
    BackendUnavailable,
    ChatMessage,
    CompletionRequest,
    RateLimited,
    Sampling,
    Usage,
)
from stratamesh.models.llm.local import LocalBackend, gguf_revision, packaged_gguf

REQUEST = CompletionRequest([ChatMessage("user", "hi")], Sampling(max_tokens=8))


class ScriptedRuntime:
    name = "scripted"

    def __init__(self, pieces: list[str], delay: float = 0.0, fail: bool = False) -> None:
        self.pieces = pieces
        self.delay = delay
        self.fail = fail
        self.loads = 0
        self.running = 0
        self.max_running = 0
        self.stopped_early = False
        self._lock = threading.Lock()

    def load(self) -> None:
        self.loads += 1

    def generate(
        self,
        request: CompletionRequest,
        emit: Callable[[str], None],
        cancelled: Callable[[], bool],
    ) -> tuple[Usage, str | None]:
        with self._lock:
            self.running += 1
            self.max_running = max(self.max_running, self.running)
        try:
            if self.fail:
                raise RuntimeError("kernel exploded")
            for n, piece in enumerate(self.pieces, start=1):
                if cancelled():
                    self.stopped_early = True
                    return Usage(5, n - 1), "cancelled"
                time.sleep(self.delay)
                emit(piece)
            return Usage(5, len(self.pieces)), "stop"
        finally:
            with self._lock:
                self.running -= 1


def local(runtime: ScriptedRuntime, tmp_path: Path, **kw: object) -> LocalBackend:
    backend = LocalBackend(models_dir=tmp_path, runtime="transformers", **kw)  # type: ignore[arg-type]
    backend._runtime = runtime  # the scripted stand-in for the model
    return backend


async def test_pieces_stream_in_order_with_ttft_usage_and_the_weights_revision(
    tmp_path: Path,
) -> None:
    runtime = ScriptedRuntime(["Par", "is", " [1]"])
    backend = local(runtime, tmp_path)
    stream = backend.stream(REQUEST)
    pieces = [p async for p in stream]
    done = stream.result
    assert pieces == ["Par", "is", " [1]"] and done is not None and done.text == "Paris [1]"
    assert done.usage == Usage(5, 3) and done.finish_reason == "stop"
    assert done.ttft_ms is not None and 0 < done.ttft_ms <= done.latency_ms
    assert done.revision == gguf_revision(packaged_gguf()) and done.adapter is None
    assert runtime.loads == 1


async def test_calls_run_one_at_a_time(tmp_path: Path) -> None:
    runtime = ScriptedRuntime(["a", "b"], delay=0.02)
    backend = local(runtime, tmp_path)
    results = await asyncio.gather(*(backend.complete(REQUEST) for _ in range(4)))
    assert [r.text for r in results] == ["ab"] * 4 and runtime.max_running == 1


async def test_a_full_queue_is_our_own_overload(tmp_path: Path) -> None:
    runtime = ScriptedRuntime(["x"] * 10, delay=0.02)
    backend = local(runtime, tmp_path, max_waiting=1)
    first = asyncio.create_task(backend.complete(REQUEST))
    await asyncio.sleep(0.05)  # first holds the model
    second = asyncio.create_task(backend.complete(REQUEST))  # waits
    await asyncio.sleep(0.01)
    with pytest.raises(RateLimited):
        await backend.complete(REQUEST)
    assert (await first).text == "x" * 10 and (await second).text == "x" * 10


async def test_the_deadline_stops_generation_mid_way(tmp_path: Path) -> None:
    runtime = ScriptedRuntime(["t"] * 100, delay=0.01)
    backend = local(runtime, tmp_path)
    request = CompletionRequest(REQUEST.messages, REQUEST.sampling, timeout_s=0.15)
    started = time.monotonic()
    with pytest.raises(BackendUnavailable, match="deadline"):
        await backend.complete(request)
    assert time.monotonic() - started < 1.0 and runtime.stopped_early
    # the model is free again at once
    ok = await backend.complete(CompletionRequest(REQUEST.messages, REQUEST.sampling))
    assert ok.text == "t" * 100


async def test_an_abandoned_stream_stops_the_worker_and_frees_the_model(tmp_path: Path) -> None:
    runtime = ScriptedRuntime(["t"] * 100, delay=0.01)
    backend = local(runtime, tmp_path)
    stream = backend.stream(REQUEST)
    async for _ in stream:
        break
    await stream.pieces.aclose()  # type: ignore[attr-defined]
    assert runtime.stopped_early and runtime.running == 0
    runtime.pieces = ["ok"]
    assert (await backend.complete(REQUEST)).text == "ok"


async def test_a_runtime_error_is_unavailability_and_no_time_means_no_call(
    tmp_path: Path,
) -> None:
    backend = local(ScriptedRuntime([], fail=True), tmp_path)
    with pytest.raises(BackendUnavailable, match="kernel exploded"):
        await backend.complete(REQUEST)
    runtime = ScriptedRuntime(["x"])
    backend = local(runtime, tmp_path)
    with pytest.raises(BackendUnavailable):
        await backend.complete(CompletionRequest(REQUEST.messages, REQUEST.sampling, timeout_s=0))
    assert runtime.loads == 0
