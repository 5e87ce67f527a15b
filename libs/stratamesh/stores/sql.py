"""The SQL store (DESIGN.md §5): one set of SQLAlchemy Core tables on Postgres or SQLite.

``STRATA_DATABASE_URL`` names a Postgres database (``postgresql+asyncpg://user@host/db``;
``postgres://`` and ``postgresql://`` are read as asyncpg); unset, the embedded default is a
SQLite file (aiosqlite) under ``$STRATA_HOME/state``.  Schemas are Alembic migrations shipped
inside the package and applied by :func:`migrate` (no ``alembic.ini`` needed).

SQLite specifics, and why:
- WAL journal: ``strata audit verify`` can read while the service appends.
- Writers open their transaction with ``BEGIN IMMEDIATE`` (:data:`WRITE`): a deferred
  transaction that reads, then writes, fails with "database is locked" when another writer
  upgraded first; an immediate one waits for the lock (``busy_timeout``) instead.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Final

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from stratamesh.config import Settings
from stratamesh.errors import ConfigError, StoreError

__all__ = [
    "DEFAULT_SQLITE_FILE",
    "WRITE",
    "database_url",
    "describe_url",
    "ensure_schema",
    "is_sqlite",
    "open_engine",
    "store_error",
]

DEFAULT_SQLITE_FILE: Final = "audit.db"
# Execution options of a connection whose transaction writes (see the module docstring).
WRITE: Final[dict[str, Any]] = {"sqlite_begin": "IMMEDIATE"}
_SQLITE_BUSY_S: Final = 30.0
_SCHEMA = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


def database_url(settings: Settings) -> str:
    """The SQLAlchemy async URL of the audit store."""
    raw = settings.database_url
    if not raw:
        path = settings.audit.sqlite_path or settings.home / "state" / DEFAULT_SQLITE_FILE
        return f"sqlite+aiosqlite:///{Path(path).expanduser().resolve()}"
    for plain, driver in (
        ("postgres://", "postgresql+asyncpg://"),
        ("postgresql://", "postgresql+asyncpg://"),
        ("sqlite://", "sqlite+aiosqlite://"),
    ):
        if raw.startswith(plain):
            return driver + raw.removeprefix(plain)
    return raw


def describe_url(url: str) -> str:
    """``url`` without its password (for messages and logs)."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<unparsable URL>"


def is_sqlite(engine: AsyncEngine) -> bool:
    return engine.dialect.name == "sqlite"


def open_engine(settings: Settings) -> AsyncEngine:
    """An engine on the audit store; with ``audit.db_schema`` (Postgres) every unqualified
    table name resolves in that schema."""
    url = database_url(settings)
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise ConfigError(
            f"STRATA_DATABASE_URL is not a database URL ({exc}); "
            "use e.g. postgresql+asyncpg://user@127.0.0.1:5432/db"
        ) from None
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_async_engine(url, connect_args={"timeout": _SQLITE_BUSY_S})
        _sqlite_hooks(engine)
        return engine
    if backend != "postgresql":
        raise ConfigError(
            f"unsupported database {backend!r} in STRATA_DATABASE_URL: use Postgres "
            "(postgresql+asyncpg://...) or unset it for the embedded SQLite"
        )
    if parsed.get_driver_name() != "asyncpg":
        url = parsed.set(drivername="postgresql+asyncpg").render_as_string(hide_password=False)
    schema = settings.audit.db_schema
    connect_args: dict[str, Any] = {}
    if schema:
        if not _SCHEMA.match(schema):
            raise ConfigError(f"invalid STRATA_AUDIT__DB_SCHEMA {schema!r}: use [a-z_][a-z0-9_]*")
        connect_args["server_settings"] = {"search_path": schema}
    return create_async_engine(url, connect_args=connect_args, pool_pre_ping=True)


def _sqlite_hooks(engine: AsyncEngine) -> None:
    @event.listens_for(engine.sync_engine, "connect")
    def _connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy, not the driver, decide when a transaction begins (and how).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _begin(conn: sa.Connection) -> None:
        mode = conn.get_execution_options().get("sqlite_begin", "DEFERRED")
        conn.exec_driver_sql(f"BEGIN {mode}")


async def ensure_schema(conn: AsyncConnection, schema: str | None) -> None:
    """Create the Postgres schema of ``audit.db_schema`` if it does not exist yet."""
    if schema and conn.dialect.name == "postgresql":
        await conn.execute(sa.text(f'CREATE SCHEMA IF NOT EXISTS "{schema}"'))


def store_error(url: str, exc: BaseException) -> StoreError:
    """A :class:`StoreError` for a failed connection, with what to do about it."""
    where = describe_url(url)
    reason = f"{type(exc).__name__}: {exc}".strip()
    if url.startswith("sqlite"):
        fix = "check that the folder is writable (STRATA_HOME or STRATA_AUDIT__SQLITE_PATH)"
    else:
        fix = (
            "start Postgres or fix STRATA_DATABASE_URL (user, host, port, database); "
            "unset it to use the embedded SQLite under STRATA_HOME"
        )
    return StoreError(f"cannot use the audit database {where} ({reason[:300]}): {fix}")
