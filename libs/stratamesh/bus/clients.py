"""Kafka client configuration, in one place: every client the mesh opens is built from it.

Services, tools and benchmarks take their broker address, security settings (SASL/TLS) and
client tuning from one :class:`~stratamesh.config.Settings`, and report an unreachable broker
the same way: a :class:`~stratamesh.errors.BrokerError` that says how to fix it.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from aiokafka import errors as kerr
from aiokafka.helpers import create_ssl_context

from stratamesh.config import Settings
from stratamesh.errors import BrokerError, StrataError

__all__ = [
    "CONNECTION_ERRORS",
    "bootstrap_servers",
    "broker_errors",
    "connect_timeout_s",
    "connection_config",
    "consumer_config",
    "producer_config",
    "unreachable",
]

# A fetch parked at the end of a partition delays every later request on the connection
# (Tansu answers requests in order): tools read data that exists, so they barely wait.
_TOOL_FETCH_WAIT_MS = 5


def bootstrap_servers(settings: Settings) -> str:
    """The configured bootstrap servers, or a :class:`BrokerError` saying how to set them."""
    if not settings.bootstrap_servers:
        raise BrokerError(
            "no broker configured: set STRATA_BOOTSTRAP_SERVERS (host:port of a Kafka broker) "
            "or start the embedded one with `strata up`"
        )
    return settings.bootstrap_servers


def connect_timeout_s(settings: Settings) -> float:
    """How long a tool waits for the broker to answer at connect time (at most 10 s)."""
    return max(0.5, min(10.0, settings.producer.request_timeout_ms / 1000))


def unreachable(settings: Settings, exc: BaseException | None = None) -> BrokerError:
    """The error for a broker that does not answer, with the way to fix it."""
    why = (
        f" ({type(exc).__name__}: {exc})"
        if exc is not None and str(exc)
        else (f" ({type(exc).__name__})" if exc is not None else "")
    )
    return BrokerError(
        f"cannot reach the Kafka broker at {settings.bootstrap_servers}{why}; is the broker "
        "running? set STRATA_BOOTSTRAP_SERVERS to a reachable host:port (or run `strata up`)"
    )


# Errors meaning "the broker did not answer" (as opposed to "the broker said no").
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    kerr.KafkaConnectionError,
    kerr.NodeNotReadyError,
    kerr.RequestTimedOutError,
    kerr.KafkaTimeoutError,
    TimeoutError,
    OSError,
)


@contextlib.asynccontextmanager
async def broker_errors(settings: Settings, action: str) -> AsyncIterator[None]:
    """Translate aiokafka and socket errors raised inside the block into :class:`BrokerError`."""
    try:
        yield
    except StrataError:
        raise
    except CONNECTION_ERRORS as exc:
        raise unreachable(settings, exc) from exc
    except kerr.KafkaError as exc:
        raise BrokerError(f"{action} failed: {type(exc).__name__}: {exc}") from exc


def _consumer_config(settings: Settings, group_id: str | None) -> dict[str, Any]:
    c = settings.consumer
    return {
        "bootstrap_servers": bootstrap_servers(settings),
        "client_id": f"{settings.client_id}-tools",
        "group_id": group_id,
        "enable_auto_commit": False,
        "auto_offset_reset": "none",
        # Tools read data that exists; a fetch parked at the end of a partition would delay
        # every later request on the connection (Tansu answers requests in order).
        "fetch_max_wait_ms": min(c.fetch_max_wait_ms, _TOOL_FETCH_WAIT_MS),
        "max_partition_fetch_bytes": c.max_partition_fetch_bytes,
        "fetch_max_bytes": max(c.max_partition_fetch_bytes, 50 * 1024 * 1024),
        "request_timeout_ms": settings.producer.request_timeout_ms,
        "isolation_level": "read_uncommitted",
    }


def connection_config(settings: Settings, *, suffix: str = "") -> dict[str, Any]:
    """Broker address, client id and security options shared by every client."""
    k = settings.kafka
    config: dict[str, Any] = {
        "bootstrap_servers": bootstrap_servers(settings),
        "client_id": settings.client_id + suffix,
        "security_protocol": k.security_protocol,
    }
    if k.security_protocol in ("SSL", "SASL_SSL"):
        config["ssl_context"] = create_ssl_context(
            cafile=k.ssl_cafile, certfile=k.ssl_certfile, keyfile=k.ssl_keyfile
        )
    if k.security_protocol.startswith("SASL"):
        config["sasl_mechanism"] = k.sasl_mechanism
        config["sasl_plain_username"] = k.sasl_username
        config["sasl_plain_password"] = (
            k.sasl_password.get_secret_value() if k.sasl_password else None
        )
    return config


def producer_config(settings: Settings, *, suffix: str = "") -> dict[str, Any]:
    p = settings.producer
    return {
        **connection_config(settings, suffix=suffix),
        "acks": "all",
        # Tansu rejects InitProducerId; duplicates are handled by event ids, not the broker.
        "enable_idempotence": False,
        "linger_ms": p.linger_ms,
        "max_batch_size": p.max_batch_size,
        "max_request_size": p.max_request_size,
        "request_timeout_ms": p.request_timeout_ms,
    }


def consumer_config(settings: Settings, group: str | None, *, tool: bool = False) -> dict[str, Any]:
    """A service consumer (``tool=False``: group member, starts at the earliest record) or a
    tool consumer (never joins a group; a read outside the log raises)."""
    c = settings.consumer
    config = {
        **connection_config(settings, suffix="-tools" if tool else ""),
        "group_id": group,
        "enable_auto_commit": False,
        "auto_offset_reset": "none" if tool else "earliest",
        "fetch_max_wait_ms": min(c.fetch_max_wait_ms, _TOOL_FETCH_WAIT_MS)
        if tool
        else c.fetch_max_wait_ms,
        "max_partition_fetch_bytes": c.max_partition_fetch_bytes,
        "fetch_max_bytes": max(c.max_partition_fetch_bytes, 50 * 1024 * 1024),
        "request_timeout_ms": settings.producer.request_timeout_ms,
    }
    if not tool:
        config["session_timeout_ms"] = c.session_timeout_ms
        config["heartbeat_interval_ms"] = c.heartbeat_interval_ms
    return config
