"""Idempotency: which events a consumer group has already fully handled.

A record is marked only after its outputs were acknowledged by the broker, and the mark
comes before the offset commit; a redelivered record whose event id is marked is skipped.
Backends: Redis (``STRATA_REDIS_URL``) shared by every instance of a group, or a local
SQLite file that survives restarts of a single-host deployment.  Lookups and marks are
batched: one round trip per fetched batch, not per record.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import redis.asyncio as aioredis

from stratamesh.config import Settings
from stratamesh.stores.keys import IDEMPOTENCY

__all__ = [
    "IdempotencyStore",
    "MemoryIdempotency",
    "RedisIdempotency",
    "SqliteIdempotency",
    "open_idempotency",
]


class IdempotencyStore(Protocol):
    async def seen(self, scope: str, event_ids: Sequence[str]) -> set[str]:
        """The subset of ``event_ids`` already handled within ``scope`` (a consumer group)."""
        ...

    async def mark(self, scope: str, event_ids: Sequence[str]) -> None:
        """Record ``event_ids`` as handled within ``scope``."""
        ...

    async def close(self) -> None: ...


class MemoryIdempotency:
    """In-process store for unit tests and the in-memory harness."""

    def __init__(self) -> None:
        self._seen: set[tuple[str, str]] = set()

    async def seen(self, scope: str, event_ids: Sequence[str]) -> set[str]:
        return {e for e in event_ids if (scope, e) in self._seen}

    async def mark(self, scope: str, event_ids: Sequence[str]) -> None:
        self._seen.update((scope, e) for e in event_ids)

    async def close(self) -> None:
        return None


# One `SET key 1 EX ttl` per id, in one round trip.  A pipeline of SETs costs the client
# ~20 µs an id (redis-py packs each command and parses each reply in Python): more than the
# rest of a record's handling.  A script takes the keys as one command.
_MARK_SCRIPT = """
for _, key in ipairs(KEYS) do
  redis.call('SET', key, '1', 'EX', ARGV[1])
end
return #KEYS
"""
# Ids per script call: bounds how long one call holds the Redis server.
_MARK_CHUNK = 1000


class RedisIdempotency:
    def __init__(self, url: str, ttl_s: int) -> None:
        self._redis = aioredis.Redis.from_url(url)
        self._ttl = ttl_s
        self._mark_script = self._redis.register_script(_MARK_SCRIPT)

    async def seen(self, scope: str, event_ids: Sequence[str]) -> set[str]:
        if not event_ids:
            return set()
        values = await self._redis.mget([f"{IDEMPOTENCY}{scope}:{e}" for e in event_ids])
        return {e for e, v in zip(event_ids, values, strict=True) if v is not None}

    async def mark(self, scope: str, event_ids: Sequence[str]) -> None:
        if not event_ids:
            return
        prefix = f"{IDEMPOTENCY}{scope}:"
        for i in range(0, len(event_ids), _MARK_CHUNK):
            keys = [prefix + e for e in event_ids[i : i + _MARK_CHUNK]]
            await self._mark_script(keys=keys, args=[self._ttl])

    async def close(self) -> None:
        await self._redis.aclose()


class SqliteIdempotency:
    """A local SQLite file.

    Look-ups are short and run on the event loop.  Marks (a whole commit interval's ids at
    once, a few µs each) run in a worker thread on a second connection: SQLite releases the
    GIL while it writes, and WAL lets the loop's reads go on meanwhile.  ``mark`` still
    returns only once the ids are committed, so offsets are committed after the marks.
    """

    _PURGE_EVERY_S = 300.0

    def __init__(self, path: Path, ttl_s: int) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = self._connect(path)
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS handled (scope TEXT NOT NULL, event_id TEXT NOT NULL, "
            "expires_at REAL NOT NULL, PRIMARY KEY (scope, event_id)) WITHOUT ROWID"
        )
        self._writer = self._connect(path)
        # A cancelled mark leaves its thread running: the next one must wait for it.
        self._writing = threading.Lock()
        self._ttl = ttl_s
        self._next_purge = time.time() + self._PURGE_EVERY_S
        self._lock = asyncio.Lock()

    @staticmethod
    def _connect(path: Path) -> sqlite3.Connection:
        db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("PRAGMA busy_timeout=5000")
        return db

    async def seen(self, scope: str, event_ids: Sequence[str]) -> set[str]:
        if not event_ids:
            return set()
        found: set[str] = set()
        now = time.time()
        for i in range(0, len(event_ids), 500):  # SQLite's bound-parameter limit
            chunk = list(event_ids[i : i + 500])
            marks = ",".join("?" * len(chunk))
            rows = self._db.execute(
                f"SELECT event_id FROM handled WHERE scope = ? AND expires_at > ? "
                f"AND event_id IN ({marks})",
                [scope, now, *chunk],
            ).fetchall()
            found.update(r[0] for r in rows)
        return found

    async def mark(self, scope: str, event_ids: Sequence[str]) -> None:
        if not event_ids:
            return
        async with self._lock:
            await asyncio.to_thread(self._write, scope, list(event_ids))

    def _write(self, scope: str, event_ids: list[str]) -> None:
        with self._writing:
            self._write_locked(scope, event_ids)

    def _write_locked(self, scope: str, event_ids: list[str]) -> None:
        now = time.time()
        db = self._writer
        db.execute("BEGIN")
        try:
            expires = now + self._ttl
            db.executemany(
                "INSERT OR REPLACE INTO handled (scope, event_id, expires_at) VALUES (?, ?, ?)",
                [(scope, e, expires) for e in event_ids],
            )
            if now > self._next_purge:
                db.execute("DELETE FROM handled WHERE expires_at < ?", (now,))
                self._next_purge = now + self._PURGE_EVERY_S
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    async def close(self) -> None:
        async with self._lock:
            with self._writing:  # not under a mark's thread still writing
                self._writer.close()
        self._db.close()


def open_idempotency(settings: Settings, name: str) -> IdempotencyStore:
    """Redis when ``STRATA_REDIS_URL`` is set, else ``$STRATA_HOME/state/<name>.idem.sqlite``."""
    if settings.redis_url:
        return RedisIdempotency(settings.redis_url, settings.idempotency_ttl_s)
    return SqliteIdempotency(
        settings.home / "state" / f"{name}.idem.sqlite", settings.idempotency_ttl_s
    )
