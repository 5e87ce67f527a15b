"""LocalEmbedder's coalescing of concurrent calls: merging, order, failure isolation,
cancellation (the model replaced by a counting function), then once with real MiniLM."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from stratamesh.models.embedders import LocalEmbedder, Vectors, _Coalescer


class FakeModel:
    """Rows of ``[len(text), call number]``; a text "boom" fails the whole call."""

    def __init__(self, hold: threading.Event | None = None) -> None:
        self.calls: list[list[str]] = []
        self.hold = hold

    def __call__(self, texts: list[str]) -> Vectors:
        if self.hold is not None:
            self.hold.wait(5)
        self.calls.append(list(texts))
        if "boom" in texts:
            raise ValueError("cannot embed boom")
        n = len(self.calls)
        return np.array([[len(t), n] for t in texts], dtype=np.float32)


async def started(coalescer: _Coalescer) -> asyncio.Task[Vectors]:
    """A first call that is in flight (blocked in the model) when this returns."""
    first = asyncio.create_task(coalescer.embed(["a"]))
    for _ in range(100):
        await asyncio.sleep(0.01)
        if coalescer._drainer is not None:
            break
    return first


async def test_callers_arriving_during_a_call_share_the_next_one() -> None:
    hold = threading.Event()
    model = FakeModel(hold)
    coalescer = _Coalescer(model, max_texts=64)
    first = await started(coalescer)
    rest = [asyncio.create_task(coalescer.embed(["x" * k] * k)) for k in (1, 2, 3)]
    await asyncio.sleep(0.05)
    hold.set()
    out = await asyncio.gather(first, *rest)
    assert model.calls == [["a"], ["x", "xx", "xx", "xxx", "xxx", "xxx"]]
    assert out[0].tolist() == [[1, 1]]
    # Each caller gets its own rows, in its order, from the merged call.
    assert [o.tolist() for o in out[1:]] == [[[1, 2]], [[2, 2]] * 2, [[3, 2]] * 3]


async def test_merged_calls_respect_max_texts_but_never_split_a_caller() -> None:
    hold = threading.Event()
    model = FakeModel(hold)
    coalescer = _Coalescer(model, max_texts=4)
    first = await started(coalescer)
    rest = [asyncio.create_task(coalescer.embed([str(i)] * 3)) for i in range(3)]
    big = asyncio.create_task(coalescer.embed(["b"] * 6))
    await asyncio.sleep(0.05)
    hold.set()
    await asyncio.gather(first, *rest, big)
    assert [len(c) for c in model.calls] == [1, 3, 3, 3, 6]


async def test_a_failing_merged_call_fails_only_the_caller_that_caused_it() -> None:
    hold = threading.Event()
    model = FakeModel(hold)
    coalescer = _Coalescer(model, max_texts=64)
    first = await started(coalescer)
    good1 = asyncio.create_task(coalescer.embed(["one"]))
    bad = asyncio.create_task(coalescer.embed(["boom"]))
    good2 = asyncio.create_task(coalescer.embed(["three"]))
    await asyncio.sleep(0.05)
    hold.set()
    await first
    assert (await good1).tolist()[0][0] == 3
    with pytest.raises(ValueError, match="boom"):
        await bad
    assert (await good2).tolist()[0][0] == 5
    # The merged call, then each caller alone.
    assert model.calls[1:] == [["one", "boom", "three"], ["one"], ["boom"], ["three"]]


async def test_a_cancelled_caller_is_left_out_and_the_others_are_served() -> None:
    hold = threading.Event()
    model = FakeModel(hold)
    coalescer = _Coalescer(model, max_texts=64)
    first = await started(coalescer)
    gone = asyncio.create_task(coalescer.embed(["gone"]))
    kept = asyncio.create_task(coalescer.embed(["kept"]))
    await asyncio.sleep(0.05)
    gone.cancel()
    hold.set()
    await first
    assert (await kept).shape == (1, 2)
    assert gone.cancelled()
    assert model.calls[1:] == [["kept"]]


@pytest.fixture(scope="module")
def minilm() -> LocalEmbedder:
    embedder = LocalEmbedder(batch_size=16)
    embedder.load()
    return embedder


async def test_coalesced_minilm_vectors_equal_separate_calls(minilm: LocalEmbedder) -> None:
    groups = [[f"question {i} about refunds"] for i in range(6)] + [["a", "longer text here"]]
    together = await asyncio.gather(*(minilm.embed(g) for g in groups))
    for group, vectors in zip(groups, together, strict=True):
        assert vectors.shape == (len(group), 384)
        np.testing.assert_allclose(vectors, minilm.embed_sync(group), atol=1e-5)
    assert (await minilm.embed([])).shape == (0, 0)


async def test_the_latency_lane_gives_the_same_vectors_on_one_intraop_thread() -> None:
    import torch

    model = LocalEmbedder.shared()
    before = torch.get_num_threads()
    texts = ["the tower was built in 1889", "it is 330 metres tall"]
    lane = await model.embed_latency(texts)
    assert np.array_equal(lane, await model.embed(texts))
    loop = asyncio.get_running_loop()
    assert await loop.run_in_executor(model._lane, torch.get_num_threads) == 1
    # The rest of the process keeps its thread count, threads started later included.
    assert torch.get_num_threads() == before
    assert await asyncio.to_thread(torch.get_num_threads) == before
