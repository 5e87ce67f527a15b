"""Document versions: what ingest has accepted per (tenant, doc id), and what a submission
becomes given that history.

**State.**  For every accepted version: its content hash (SHA-256 of the normalised
structure), its *fingerprint* (content hash plus everything else a chunk carries: title,
knowledge class, requested expiry, ACL, metadata, chunk profile), the id of the
submission event that created it and the version it superseded.  Backends:

* Redis (``STRATA_REDIS_URL``): one hash per document,
  ``strata:ingest:doc:<scope>:<len(tenant)>:<tenant>:<doc id>`` (:data:`DOC_VERSIONS`),
  field ``v<version>`` → JSON record; no TTL (a document's history lives as long as it);
* else a SQLite file ``$STRATA_HOME/state/<scope>.versions.sqlite``.

The scope is the consumer group, so a shadow ingest pipeline keeps its own history.

**Decision** (:func:`decide`), in order:

1. the submission event already created a version (a redelivery after the state was
   written but before the offset was committed) → :class:`Replay` of that version: the
   handler re-emits the same output under the same derived event id;
2. an explicit ``doc_version`` that exists: same fingerprint → :class:`Unchanged`,
   different → ``version_conflict`` (versions are pinned: never rewritten);
3. an explicit ``doc_version`` below the latest → ``stale_version``;
4. the same fingerprint as the latest version → :class:`Unchanged` (idempotent
   re-submission: nothing new is produced);
5. otherwise :class:`Accept` version ``doc_version`` (or latest + 1), superseding the latest.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import sqlite3
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Final, Protocol

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from stratamesh.config import Settings
from stratamesh.errors import Transient

__all__ = [
    "DOC_VERSIONS",
    "Accept",
    "Conflict",
    "Decision",
    "DocHistory",
    "MemoryVersionStore",
    "RedisVersionStore",
    "Replay",
    "SqliteVersionStore",
    "Unchanged",
    "VersionRecord",
    "VersionStore",
    "decide",
    "fingerprint",
    "open_version_store",
]

# Redis key prefix of the version history of one document (see the module docstring).
DOC_VERSIONS: Final = "strata:ingest:doc:"

DocKey = tuple[str, str]  # (tenant, doc id)


@dataclass(frozen=True, slots=True)
class VersionRecord:
    version: int
    content_hash: str
    fingerprint: str
    event_id: str  # the DocumentSubmitted that created this version
    supersedes: int | None
    created_ms: int


@dataclass(slots=True)
class DocHistory:
    versions: dict[int, VersionRecord] = field(default_factory=dict)

    @property
    def latest(self) -> VersionRecord | None:
        return self.versions[max(self.versions)] if self.versions else None

    def by_event(self, event_id: str) -> VersionRecord | None:
        for rec in self.versions.values():
            if rec.event_id == event_id:
                return rec
        return None


def fingerprint(
    content_hash: str,
    *,
    title: str,
    knowledge_class: str,
    expires_at_ms: int | None,
    acl: Iterable[str],
    metadata: dict[str, str],
    chunk_profile: str | None,
) -> str:
    """SHA-256 of everything a chunk of this submission carries, content included.

    A re-submission differing only in, say, its ACL is a new version (so the new ACL
    takes effect), while an identical one is unchanged.  The *requested* expiry counts, not
    the default one ingest gives a fluid document without expiry.
    """
    material = json.dumps(
        [content_hash, title, knowledge_class, expires_at_ms, sorted(set(acl)),
         sorted(metadata.items()), chunk_profile],
        ensure_ascii=False,
    )  # fmt: skip
    return hashlib.sha256(material.encode()).hexdigest()


# -- decisions ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Replay:
    record: VersionRecord


@dataclass(frozen=True, slots=True)
class Unchanged:
    record: VersionRecord


@dataclass(frozen=True, slots=True)
class Accept:
    version: int
    supersedes: int | None


@dataclass(frozen=True, slots=True)
class Conflict:
    code: str
    reason: str
    hint: str
    field: str = "doc_version"


Decision = Replay | Unchanged | Accept | Conflict


def decide(
    history: DocHistory, *, requested: int | None, fingerprint: str, event_id: str
) -> Decision:
    """What a submission becomes, given the document's history (see the module docstring)."""
    done = history.by_event(event_id)
    if done is not None:
        return Replay(done)
    latest = history.latest
    if requested is not None:
        existing = history.versions.get(requested)
        if existing is not None:
            if existing.fingerprint == fingerprint:
                return Unchanged(existing)
            return Conflict(
                "version_conflict",
                f"version {requested} already exists with different content; versions are "
                "pinned and never rewritten",
                f"submit the change as version {latest.version + 1 if latest else requested + 1}"
                " or without doc_version (ingest then assigns the next version)",
            )
        if latest is not None and requested < latest.version:
            return Conflict(
                "stale_version",
                f"version {requested} is older than the latest version {latest.version}",
                f"versions must increase: submit version {latest.version + 1} or later, or "
                "leave doc_version empty",
            )
    if latest is not None and latest.fingerprint == fingerprint:
        return Unchanged(latest)
    version = requested if requested is not None else (latest.version + 1 if latest else 1)
    return Accept(version, latest.version if latest else None)


# -- stores -------------------------------------------------------------------------------------


class VersionStore(Protocol):
    async def load(self, keys: Sequence[DocKey]) -> dict[DocKey, DocHistory]:
        """The histories of ``keys`` (an empty history for an unknown document)."""
        ...

    async def save(self, records: Sequence[tuple[DocKey, VersionRecord]]) -> None:
        """Store version records (idempotent: saving a record twice changes nothing)."""
        ...

    async def close(self) -> None: ...


class MemoryVersionStore:
    """In-process store for tests."""

    def __init__(self) -> None:
        self._docs: dict[DocKey, dict[int, VersionRecord]] = {}

    async def load(self, keys: Sequence[DocKey]) -> dict[DocKey, DocHistory]:
        return {k: DocHistory(dict(self._docs.get(k, {}))) for k in keys}

    async def save(self, records: Sequence[tuple[DocKey, VersionRecord]]) -> None:
        for key, rec in records:
            self._docs.setdefault(key, {})[rec.version] = rec

    async def close(self) -> None:
        return None


class SqliteVersionStore:
    """A local SQLite file; statements are short enough to run on the event loop."""

    def __init__(self, path: Path, scope: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._scope = scope
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS doc_versions (scope TEXT NOT NULL, tenant TEXT NOT NULL,"
            " doc_id TEXT NOT NULL, version INTEGER NOT NULL, content_hash TEXT NOT NULL,"
            " fingerprint TEXT NOT NULL, event_id TEXT NOT NULL, supersedes INTEGER,"
            " created_ms INTEGER NOT NULL, PRIMARY KEY (scope, tenant, doc_id, version))"
            " WITHOUT ROWID"
        )
        self._lock = asyncio.Lock()

    async def load(self, keys: Sequence[DocKey]) -> dict[DocKey, DocHistory]:
        out = {k: DocHistory() for k in keys}
        for tenant, doc_id in out:
            rows = self._db.execute(
                "SELECT version, content_hash, fingerprint, event_id, supersedes, created_ms "
                "FROM doc_versions WHERE scope = ? AND tenant = ? AND doc_id = ?",
                (self._scope, tenant, doc_id),
            ).fetchall()
            out[(tenant, doc_id)] = DocHistory({r[0]: VersionRecord(*r) for r in rows})
        return out

    async def save(self, records: Sequence[tuple[DocKey, VersionRecord]]) -> None:
        if not records:
            return
        async with self._lock:
            self._db.execute("BEGIN")
            try:
                self._db.executemany(
                    "INSERT OR REPLACE INTO doc_versions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [
                        (self._scope, t, d, r.version, r.content_hash, r.fingerprint,
                         r.event_id, r.supersedes, r.created_ms)
                        for (t, d), r in records
                    ],
                )  # fmt: skip
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    async def close(self) -> None:
        self._db.close()


def redis_doc_key(scope: str, tenant: str, doc_id: str) -> str:
    # The tenant's length makes the key unambiguous whatever ':' the names contain.
    return f"{DOC_VERSIONS}{scope}:{len(tenant)}:{tenant}:{doc_id}"


class RedisVersionStore:
    def __init__(self, url: str, scope: str) -> None:
        self._redis = aioredis.Redis.from_url(url)
        self._scope = scope

    async def load(self, keys: Sequence[DocKey]) -> dict[DocKey, DocHistory]:
        unique = list(dict.fromkeys(keys))
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for tenant, doc_id in unique:
                    pipe.hgetall(redis_doc_key(self._scope, tenant, doc_id))
                results = await pipe.execute()
        except (RedisError, OSError) as exc:
            raise Transient(f"redis unavailable while loading document versions: {exc}") from exc
        out: dict[DocKey, DocHistory] = {}
        for key, fields in zip(unique, results, strict=True):
            history = DocHistory()
            for raw in fields.values():
                rec = VersionRecord(**json.loads(raw))
                history.versions[rec.version] = rec
            out[key] = history
        return out

    async def save(self, records: Sequence[tuple[DocKey, VersionRecord]]) -> None:
        if not records:
            return
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                for (tenant, doc_id), rec in records:
                    pipe.hset(
                        redis_doc_key(self._scope, tenant, doc_id),
                        f"v{rec.version}",
                        json.dumps(asdict(rec)),
                    )
                await pipe.execute()
        except (RedisError, OSError) as exc:
            raise Transient(f"redis unavailable while saving document versions: {exc}") from exc

    async def close(self) -> None:
        await self._redis.aclose()


def open_version_store(settings: Settings, scope: str) -> VersionStore:
    """Redis when ``STRATA_REDIS_URL`` is set, else a SQLite file under ``$STRATA_HOME/state``."""
    if settings.redis_url:
        return RedisVersionStore(settings.redis_url, scope)
    return SqliteVersionStore(settings.home / "state" / f"{scope}.versions.sqlite", scope)


def now_ms() -> int:
    return time.time_ns() // 1_000_000
