"""Consensus's calls to a local embedding model: one dedicated thread, one intra-op thread.

The shared path (``LocalEmbedder.embed``) runs the model on the default executor's threads
with torch's process-wide intra-op thread count (every core).  That suits batches; consensus
embeds one or two answers at a time, on the path of a decision, and there intra-op
parallelism buys little and costs a lot as soon as a core is busy (the broker, Redis, the
other services): the OpenMP team waits for its descheduled member.  Measured with the
bundled MiniLM, one ~20-token answer, 2-core EPYC: 15 ms with 2 threads and 19 ms with 1 on
an idle machine; with one core busy, 2 threads took p50 80–430 ms (max 0.8 s), 1 thread
22–34 ms (max 80 ms).

So consensus runs the model's blocking ``embed_sync`` on its own thread, set to one intra-op
thread for that thread only (torch keeps the count per thread once a thread has used it; the
process default, which threads created later start from, is put back), and merges the
calls that arrive while one is running into the next (no timer: an idle model adds no
latency).  Same model, same weights: the vectors are bit-identical to the shared path's for
the same batch (torch's CPU kernels give the same results with 1 or 2 threads here).
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from stratamesh.models.embedders import LocalEmbedder, Vectors

__all__ = ["ModelThread", "model_thread"]

_MAX_TEXTS = 64  # per model call


def _one_intraop_thread() -> None:
    """Initializer of the model thread: its torch ops run on one intra-op thread."""
    try:
        import torch
    except ImportError:  # a local model without torch: nothing to tune
        return
    default = torch.get_num_threads()  # also fixes this thread's own count from now on
    torch.set_num_threads(1)
    # set_num_threads also changed the default that threads created later start with: put
    # it back from a throwaway thread (this thread keeps 1).
    restore = threading.Thread(target=torch.set_num_threads, args=(default,))
    restore.start()
    restore.join()


@dataclass(slots=True)
class _Queue:
    """The calls waiting on one event loop."""

    waiting: list[tuple[list[str], asyncio.Future[Vectors]]] = field(default_factory=list)
    drainer: asyncio.Task[None] | None = None


class ModelThread:
    """Runs one local model's ``embed_sync`` on a dedicated thread, merging waiting calls."""

    def __init__(self, model: LocalEmbedder, *, max_texts: int = _MAX_TEXTS) -> None:
        self.model = model
        self.max_texts = max_texts
        self._pool = ThreadPoolExecutor(
            1, thread_name_prefix="consensus-embed", initializer=_one_intraop_thread
        )
        self._queues: dict[asyncio.AbstractEventLoop, _Queue] = {}

    async def embed(self, texts: Sequence[str]) -> Vectors:
        loop = asyncio.get_running_loop()
        queue = self._queues.get(loop)
        if queue is None:
            # Keyed by loop (tests run several one after another); closed ones are dropped.
            self._queues = {k: v for k, v in self._queues.items() if not k.is_closed()}
            queue = self._queues[loop] = _Queue()
        future: asyncio.Future[Vectors] = loop.create_future()
        queue.waiting.append((list(texts), future))
        if queue.drainer is None or queue.drainer.done():
            queue.drainer = loop.create_task(self._drain(queue), name="consensus-embed")
        return await future

    def _take(self, queue: _Queue) -> list[tuple[list[str], asyncio.Future[Vectors]]]:
        taken: list[tuple[list[str], asyncio.Future[Vectors]]] = []
        size = 0
        while queue.waiting:
            texts, future = queue.waiting[0]
            if taken and size + len(texts) > self.max_texts:
                break
            queue.waiting.pop(0)
            if future.done():  # its caller was cancelled
                continue
            taken.append((texts, future))
            size += len(texts)
        return taken

    async def _drain(self, queue: _Queue) -> None:
        loop = asyncio.get_running_loop()
        while queue.waiting:
            batch = self._take(queue)
            if not batch:
                continue
            flat = [t for texts, _ in batch for t in texts]
            try:
                vectors = await loop.run_in_executor(self._pool, self.model.embed_sync, flat)
            except asyncio.CancelledError:  # the loop is shutting down: so are the callers
                for _, future in batch + queue.waiting:
                    future.cancel()
                raise
            except Exception as exc:
                if len(batch) == 1:
                    _settle(batch[0][1], exc)
                else:  # isolate the failure to its caller(s)
                    for texts, future in batch:
                        try:
                            alone = await loop.run_in_executor(
                                self._pool, self.model.embed_sync, texts
                            )
                        except Exception as own:
                            _settle(future, own)
                        else:
                            _settle(future, alone)
                continue
            start = 0
            for texts, future in batch:
                _settle(future, vectors[start : start + len(texts)])
                start += len(texts)


def _settle(future: asyncio.Future[Vectors], outcome: Vectors | BaseException) -> None:
    if future.done():
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)


_threads: weakref.WeakKeyDictionary[LocalEmbedder, ModelThread] = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def model_thread(model: LocalEmbedder) -> ModelThread:
    """The one model thread of ``model`` in this process (engines re-bound share it)."""
    with _lock:
        found = _threads.get(model)
        if found is None:
            found = _threads[model] = ModelThread(model)
        return found
