"""The audit store: appending chained, sealed records; verifying chains; pruning with anchors.

Concurrency (several audit consumers, rebalances): an append is one transaction per chain
that locks the chain's head row (``SELECT … FOR UPDATE`` on Postgres; SQLite's single
writer via ``BEGIN IMMEDIATE``), drops events already recorded (unique ``(topic, dedupe)``),
numbers the rest after the head, and moves the head only if it is still where it was read
(``UPDATE … WHERE head_seq = :read``).  Two consumers briefly owning one partition therefore
serialise on the head: the second sees the first's records, skips them as duplicates and
appends the rest after them — never a fork (``(chain, seq)`` is unique as well).  A conflict
that slips through anyway (a constraint violation) rolls back and is retried.

Hot paths bypass SQLAlchemy (whose per-row parameter and result processing cost more than
the database work): on Postgres an append is one ``COPY`` of the batch on the pooled
asyncpg connection (five round trips a batch in all), and verification reads through the
bare driver — asyncpg with a prepared statement and a cursor; on SQLite a plain ``sqlite3``
connection driven from worker threads, so the engine reads the next page while this one is
checked — asking the database for the content already joined (:data:`chain.PACKED_FIELDS`).
Everything else (migrations, pruning, the ledger, traces) goes through SQLAlchemy.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Protocol

import sqlalchemy as sa
import structlog
from alembic import command
from alembic.config import Config
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, IntegrityError, OperationalError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from stratamesh.audit import chain as C
from stratamesh.audit.schema import (
    ANCHORS_TABLE,
    CHAINS_TABLE,
    RECORDS_TABLE,
    anchors,
    chains,
    records,
)
from stratamesh.config import Settings
from stratamesh.errors import StoreError
from stratamesh.security.keys import Keyring, SigningKey
from stratamesh.security.signing import SignatureCache
from stratamesh.stores.sql import (
    WRITE,
    database_url,
    ensure_schema,
    is_sqlite,
    open_engine,
    store_error,
)

if TYPE_CHECKING:
    import asyncpg  # type: ignore[import-untyped]

__all__ = [
    "AppendResult",
    "AuditStore",
    "PruneResult",
    "VerifyReport",
    "chain_name",
    "now_ms",
]

log = structlog.get_logger("stratamesh.audit")

_MIGRATIONS: Final = Path(__file__).with_name("migrations")
_APPEND_ATTEMPTS: Final = 8
# Rows fetched per round trip while verifying (and checked between two reads).
_PAGE: Final = 5_000
_ROW_COLUMNS: Final = [records.c[name] for name in C.ROW_FIELDS]
_SEQ_MIN, _SEQ_MAX = -(2**63), 2**63 - 1
_TEXT_FIELDS: Final = frozenset(
    name for name in C.CONTENT_FIELDS if isinstance(records.c[name].type, sa.String)
)
_INSERT_COLUMNS: Final = ("chain", "seq", *C.CONTENT_FIELDS, "prev_hash", "hash", "signer", "seal")


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def chain_name(topic: str, partition: int) -> str:
    """One chain per topic-partition: its owner is one consumer at a time (mostly)."""
    return f"{topic}/{partition}"


@dataclass(frozen=True, slots=True)
class AppendResult:
    added: int
    duplicates: int
    head_seq: int
    recorded: tuple[C.Entry, ...] = ()  # the entries appended (duplicates left out)


@dataclass(slots=True)
class VerifyReport:
    chains: int = 0
    records: int = 0
    seconds: float = 0.0
    findings: list[C.Finding] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.findings

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "chains": self.chains,
            "records": self.records,
            "seconds": round(self.seconds, 3),
            "findings": [f.as_dict() for f in self.findings],
        }


@dataclass(frozen=True, slots=True)
class PruneResult:
    chain: str
    pruned: int
    anchor_seq: int


class _Conflict(Exception):
    """Another writer moved the chain's head between our read and our update."""


def _packed_sql(dialect: str, *, with_id: bool) -> str:
    """The query of a chain's records as ``[id,] *PACKED_FIELDS`` over ``chain, lo, hi``.

    Each side of ``cost_usd`` is joined by the database: ints in decimal, strings as they
    are — what ``str()`` gives, so the bytes hashed are the ones hashed at append time.
    """
    if dialect == "postgresql":

        def joined(fields: Sequence[str]) -> str:
            parts = [f if f in _TEXT_FIELDS else f"{f}::text" for f in fields]
            # || (not concat_ws) so that a NULL makes the whole value NULL, never shifts it.
            return f"convert_to({' || chr(31) || '.join(parts)}, 'UTF8')"

        prev, hash_, where = "convert_to(prev_hash, 'UTF8')", "convert_to(hash, 'UTF8')", "$1"
        bounds = "$2 AND $3"
    else:

        def joined(fields: Sequence[str]) -> str:
            # One printf is several times cheaper in SQLite than a chain of ||.  It renders
            # a value by its text, whatever its storage class (a BLOB holding a field's
            # bytes is that field), and the separator is the 0x1f of chain.canonical.
            fmt = "\x1f".join(["%s"] * len(fields))
            return f"printf('{fmt}', {', '.join(fields)})"

        prev, hash_, where, bounds = "prev_hash", "hash", "?", "? AND ?"
    columns = [
        "seq",
        prev,
        hash_,
        "signer",
        "seal",
        joined(C.CONTENT_FIELDS[: C.COST_AT]),
        "cost_usd",
        joined(C.CONTENT_FIELDS[C.COST_AT + 1 :]),
    ]
    if with_id:
        columns.insert(0, "id")
    return (
        f"SELECT {', '.join(columns)} FROM {RECORDS_TABLE} "
        f"WHERE chain = {where} AND seq BETWEEN {bounds} ORDER BY seq"
    )


_HEAD_SQL: Final = f"SELECT head_seq, head_hash, signer, seal FROM {CHAINS_TABLE} WHERE chain = "
_ANCHOR_SQL: Final = (
    f"SELECT seq, hash, pruned, signer, seal FROM {ANCHORS_TABLE} WHERE chain = {{}} "
    "ORDER BY seq DESC LIMIT 1"
)


class _Reader(Protocol):
    """What verification reads of a chain, in one snapshot."""

    async def head(self, name: str) -> Sequence[Any] | None:
        """head_seq, head_hash, signer, seal"""

    async def anchor(self, name: str) -> Sequence[Any] | None:
        """seq, hash, pruned, signer, seal of the newest prune anchor"""

    def pages(
        self, name: str, lo: int, hi: int, *, with_id: bool
    ) -> AsyncGenerator[Sequence[Sequence[Any]], None]:
        """The records with ``lo <= seq <= hi`` as ``[id,] *PACKED_FIELDS``, in seq order."""
        ...


class _PostgresReader:
    """asyncpg itself: binary rows decoded in C, one prepared statement, a cursor."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn

    async def head(self, name: str) -> Sequence[Any] | None:
        row: Sequence[Any] | None = await self.conn.fetchrow(_HEAD_SQL + "$1", name)
        return row

    async def anchor(self, name: str) -> Sequence[Any] | None:
        row: Sequence[Any] | None = await self.conn.fetchrow(_ANCHOR_SQL.format("$1"), name)
        return row

    async def pages(
        self, name: str, lo: int, hi: int, *, with_id: bool
    ) -> AsyncGenerator[Sequence[Sequence[Any]], None]:
        stmt = await self.conn.prepare(_packed_sql("postgresql", with_id=with_id))
        cursor = await stmt.cursor(name, lo, hi)
        pending = asyncio.ensure_future(cursor.fetch(_PAGE))
        try:
            while page := await pending:
                # Ask for the next page before this one is checked: the server builds it
                # meanwhile.
                pending = asyncio.ensure_future(cursor.fetch(_PAGE))
                await asyncio.sleep(0)
                yield page
        finally:
            with contextlib.suppress(Exception):
                await pending


class _SqliteReader:
    """The sqlite3 module on worker threads: the next page is read (SQLite releases the
    GIL while it steps) while the event loop checks the current one."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    async def _one(self, sql: str, name: str) -> Sequence[Any] | None:
        row: Sequence[Any] | None = await asyncio.to_thread(
            lambda: self.conn.execute(sql, (name,)).fetchone()
        )
        return row

    async def head(self, name: str) -> Sequence[Any] | None:
        return await self._one(_HEAD_SQL + "?", name)

    async def anchor(self, name: str) -> Sequence[Any] | None:
        return await self._one(_ANCHOR_SQL.format("?"), name)

    async def pages(
        self, name: str, lo: int, hi: int, *, with_id: bool
    ) -> AsyncGenerator[Sequence[Sequence[Any]], None]:
        loop = asyncio.get_running_loop()
        sql = _packed_sql("sqlite", with_id=with_id)
        cursor = await asyncio.to_thread(self.conn.execute, sql, (name, lo, hi))
        # run_in_executor, not to_thread: the read must start now, not at the next await.
        pending = loop.run_in_executor(None, cursor.fetchmany, _PAGE)
        try:
            while page := await pending:
                pending = loop.run_in_executor(None, cursor.fetchmany, _PAGE)
                yield page
        finally:
            with contextlib.suppress(Exception):
                await pending
            cursor.close()


class _SqlAlchemyReader:
    """Any other database SQLAlchemy speaks (e.g. an in-memory SQLite): full rows, packed
    here."""

    def __init__(self, conn: AsyncConnection) -> None:
        self.conn = conn

    async def head(self, name: str) -> Sequence[Any] | None:
        query = sa.select(chains.c.head_seq, chains.c.head_hash, chains.c.signer, chains.c.seal)
        return (await self.conn.execute(query.where(chains.c.chain == name))).first()

    async def anchor(self, name: str) -> Sequence[Any] | None:
        query = (
            sa.select(anchors.c.seq, anchors.c.hash, anchors.c.pruned, anchors.c.signer)
            .add_columns(anchors.c.seal)
            .where(anchors.c.chain == name)
            .order_by(anchors.c.seq.desc())
            .limit(1)
        )
        return (await self.conn.execute(query)).first()

    async def pages(
        self, name: str, lo: int, hi: int, *, with_id: bool
    ) -> AsyncGenerator[Sequence[Sequence[Any]], None]:
        query = (
            sa.select(*_ROW_COLUMNS)
            .where(records.c.chain == name, records.c.seq.between(lo, hi))
            .order_by(records.c.seq)
        )
        stream = await self.conn.stream(query.execution_options(yield_per=_PAGE))
        skip = 0 if with_id else 1
        async for page in stream.partitions(_PAGE):
            yield [C.pack(row)[skip:] for row in page]


def _sqlite_file(url: str) -> str | None:
    """The database file of a SQLite URL (None: not SQLite, or in memory)."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        return None
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return str(parsed.database)


async def _driver(conn: AsyncConnection) -> asyncpg.Connection:
    """The asyncpg connection under a pooled SQLAlchemy one (its transaction untouched)."""
    raw = (await conn.get_raw_connection()).driver_connection
    assert raw is not None
    return raw


def _open_sqlite(path: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=30.0, isolation_level=None, check_same_thread=False)
    conn.text_factory = bytes  # hashed as bytes: no decoding and re-encoding of every field
    conn.execute("BEGIN")  # one snapshot (WAL): the head and the rows it seals
    return conn


def _close_sqlite(conn: sqlite3.Connection) -> None:
    try:
        conn.execute("ROLLBACK")
    finally:
        conn.close()


def _migrate(sync_conn: sa.Connection) -> None:
    cfg = Config()
    cfg.set_main_option("script_location", str(_MIGRATIONS))
    cfg.attributes["connection"] = sync_conn
    command.upgrade(cfg, "head")


def _fresh(entries: Sequence[C.Entry], seen: set[tuple[str, str]]) -> list[C.Entry]:
    """``entries`` not recorded yet (``seen``), each once."""
    fresh = []
    for e in entries:
        key = (e.topic, e.dedupe)
        if key not in seen:
            seen.add(key)
            fresh.append(e)
    return fresh


class AuditStore:
    """The audit tables of one database (see the module docstring)."""

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        keyring: Keyring | None = None,
        signer: SigningKey | None = None,
        schema: str | None = None,
        url: str = "",
    ) -> None:
        self.engine = engine
        self.keyring = keyring or Keyring()
        self.signer = signer
        self.schema = schema
        self.url = url

    @classmethod
    async def open(
        cls,
        settings: Settings,
        *,
        signer: SigningKey | None = None,
        keyring: Keyring | None = None,
        migrate: bool = True,
    ) -> AuditStore:
        """The store of ``settings`` (tables migrated to the latest revision unless told not)."""
        engine = open_engine(settings)
        store = cls(
            engine,
            keyring=keyring if keyring is not None else Keyring.load(settings.keys_dir),
            signer=signer,
            schema=settings.audit.db_schema,
            url=database_url(settings),
        )
        try:
            if migrate:
                await store.migrate()
            else:
                async with engine.connect() as conn:
                    await conn.execute(sa.text("SELECT 1"))
        except (OSError, DBAPIError) as exc:
            await engine.dispose()
            raise store_error(store.url, exc) from exc
        return store

    async def close(self) -> None:
        await self.engine.dispose()

    async def migrate(self) -> None:
        """Bring the tables to the latest migration (idempotent; concurrent-safe on Postgres
        through the transaction's DDL locks, on SQLite through its single writer)."""
        async with self._writing() as conn:
            await ensure_schema(conn, self.schema)
            await conn.run_sync(_migrate)

    @contextlib.asynccontextmanager
    async def _writing(self) -> AsyncIterator[AsyncConnection]:
        """A write transaction (``BEGIN IMMEDIATE`` on SQLite: see stores.sql)."""
        async with self.engine.connect() as conn:
            await conn.execution_options(**WRITE)
            async with conn.begin():
                yield conn

    # -- appending ------------------------------------------------------------------------

    async def append(self, chain: str, entries: Sequence[C.Entry]) -> AppendResult:
        """Append ``entries`` (one chain, in order) as chained, sealed records; events already
        recorded are skipped."""
        if self.signer is None:
            raise StoreError("this audit store was opened without a signing key: read-only")
        if not entries:
            return AppendResult(0, 0, -1)
        dialect = self.engine.dialect
        postgres = dialect.name == "postgresql" and dialect.driver == "asyncpg"
        for attempt in range(1, _APPEND_ATTEMPTS + 1):
            try:
                if postgres:
                    return await self._append_postgres(chain, entries)
                async with self._writing() as conn:
                    return await self._append(conn, chain, entries)
            except (IntegrityError, _Conflict) as exc:
                if attempt == _APPEND_ATTEMPTS:
                    raise StoreError(f"chain {chain}: appends keep conflicting ({exc})") from exc
                log.info("audit chain contended, retrying", chain=chain, attempt=attempt)
                await asyncio.sleep(0.01 * attempt)
        raise AssertionError("unreachable")

    def _build(
        self, chain: str, seq0: int, prev: str, fresh: Sequence[C.Entry]
    ) -> tuple[list[tuple[Any, ...]], list[bytes]]:
        """The rows (:data:`_INSERT_COLUMNS`) of ``fresh`` appended after ``(seq0, prev)``,
        and the batch's seals (the head's last)."""
        assert self.signer is not None
        signer = self.signer.identity
        rows: list[tuple[Any, ...]] = []
        leaves: list[bytes] = []
        seq = seq0
        for e in fresh:
            seq += 1
            content = e.content()
            h = C.record_hash(prev, content)
            rows.append((chain, seq, *content, prev, h, signer))
            leaves.append(bytes.fromhex(h))
            prev = h
        leaves.append(C.head_leaf(chain, seq, prev))
        seals = C.seal(self.signer, leaves)
        return [(*row, s) for row, s in zip(rows, seals, strict=False)], seals

    async def _append(
        self, conn: AsyncConnection, chain: str, entries: Sequence[C.Entry]
    ) -> AppendResult:
        assert self.signer is not None
        head = (
            await conn.execute(
                sa.select(chains.c.head_seq, chains.c.head_hash)
                .where(chains.c.chain == chain)
                .with_for_update()
            )
        ).first()
        seq0, prev = (0, C.genesis(chain)) if head is None else (int(head[0]), str(head[1]))
        seen: set[tuple[str, str]] = set()
        by_topic: dict[str, list[str]] = {}
        for e in entries:
            by_topic.setdefault(e.topic, []).append(e.dedupe)
        for topic, keys in by_topic.items():
            rows = await conn.execute(
                sa.select(records.c.dedupe).where(
                    records.c.topic == topic, records.c.dedupe.in_(keys)
                )
            )
            seen.update((topic, k) for (k,) in rows)
        fresh = _fresh(entries, seen)
        if not fresh:
            return AppendResult(0, len(entries), seq0)
        rows_out, seals = self._build(chain, seq0, prev, fresh)
        seq, prev = seq0 + len(fresh), rows_out[-1][_INSERT_COLUMNS.index("hash")]
        # The DBAPI's executemany as is: SQLAlchemy's per-parameter processing costs more
        # than SQLite's insert.
        await conn.exec_driver_sql(
            f"INSERT INTO {RECORDS_TABLE} ({', '.join(_INSERT_COLUMNS)}) "
            f"VALUES ({', '.join('?' * len(_INSERT_COLUMNS))})",
            rows_out,
        )
        values = {
            "head_seq": seq,
            "head_hash": prev,
            "signer": self.signer.identity,
            "seal": seals[-1],
            "updated_ms": now_ms(),
        }
        if head is None:
            await conn.execute(chains.insert().values(chain=chain, **values))
        else:
            moved = await conn.execute(
                chains.update()
                .where(chains.c.chain == chain, chains.c.head_seq == seq0)
                .values(**values)
            )
            if moved.rowcount != 1:
                raise _Conflict(f"head of {chain} moved")
        return AppendResult(len(fresh), len(entries) - len(fresh), seq, tuple(fresh))

    async def _append_postgres(self, chain: str, entries: Sequence[C.Entry]) -> AppendResult:
        """:meth:`_append` on asyncpg itself: lock the head, look up duplicates, COPY the
        batch, move the head: the same round trips whatever the batch size."""
        import asyncpg

        assert self.signer is not None
        async with self.engine.connect() as sa_conn:
            conn = await _driver(sa_conn)
            try:
                async with conn.transaction():
                    head = await conn.fetchrow(
                        f"SELECT head_seq, head_hash FROM {CHAINS_TABLE} "
                        "WHERE chain = $1 FOR UPDATE",
                        chain,
                    )
                    seq0, prev = (
                        (0, C.genesis(chain)) if head is None else (int(head[0]), str(head[1]))
                    )
                    # After the lock: a writer that held it has committed, its rows are seen.
                    found = await conn.fetch(
                        f"SELECT topic, dedupe FROM {RECORDS_TABLE} WHERE (topic, dedupe) IN "
                        "(SELECT * FROM unnest($1::text[], $2::text[]))",
                        [e.topic for e in entries],
                        [e.dedupe for e in entries],
                    )
                    fresh = _fresh(entries, {(r[0], r[1]) for r in found})
                    if not fresh:
                        return AppendResult(0, len(entries), seq0)
                    rows, seals = self._build(chain, seq0, prev, fresh)
                    seq, prev = seq0 + len(fresh), rows[-1][_INSERT_COLUMNS.index("hash")]
                    await conn.copy_records_to_table(
                        RECORDS_TABLE, records=rows, columns=list(_INSERT_COLUMNS)
                    )
                    args = (chain, seq, prev, self.signer.identity, seals[-1], now_ms())
                    if head is None:
                        await conn.execute(
                            f"INSERT INTO {CHAINS_TABLE} "
                            "(chain, head_seq, head_hash, signer, seal, updated_ms) "
                            "VALUES ($1, $2, $3, $4, $5, $6)",
                            *args,
                        )
                    elif (
                        await conn.execute(
                            f"UPDATE {CHAINS_TABLE} SET head_seq = $2, head_hash = $3, "
                            "signer = $4, seal = $5, updated_ms = $6 "
                            "WHERE chain = $1 AND head_seq = $7",
                            *args,
                            seq0,
                        )
                        != "UPDATE 1"
                    ):
                        raise _Conflict(f"head of {chain} moved")
            except asyncpg.IntegrityConstraintViolationError as exc:
                raise _Conflict(f"chain {chain}: {exc}") from exc
        return AppendResult(len(fresh), len(entries) - len(fresh), seq, tuple(fresh))

    # -- verification ---------------------------------------------------------------------

    async def chain_names(self) -> list[str]:
        """Every chain with a head or with records (a chain whose head row was deleted too)."""
        async with self.engine.connect() as conn:
            heads = {r[0] for r in await conn.execute(sa.select(chains.c.chain))}
            rows = {r[0] for r in await conn.execute(sa.select(records.c.chain).distinct())}
        return sorted(heads | rows)

    async def verify(
        self,
        only: Sequence[str] | None = None,
        *,
        from_seq: int | None = None,
        to_seq: int | None = None,
    ) -> VerifyReport:
        """Verify every chain (or ``only`` these), or the range ``[from_seq, to_seq]`` of each.

        A range is checked inside (contents, seals, links); the link into it is taken from
        its first record, and the tail is compared with the sealed head only when the range
        reaches the end.
        """
        started = time.perf_counter()
        report = VerifyReport()
        names = list(only) if only else await self.chain_names()
        cache = SignatureCache(size=1 << 16)
        for name in names:
            found, count = await self._verify_chain(name, from_seq, to_seq, cache)
            report.chains += 1
            report.records += count
            report.findings += found
        report.seconds = time.perf_counter() - started
        return report

    @contextlib.asynccontextmanager
    async def _reader(self) -> AsyncIterator[_Reader]:
        """A reader of the records in one snapshot, on the fastest path the database has."""
        path = _sqlite_file(self.url) if is_sqlite(self.engine) else None
        if path is not None:
            lite = await asyncio.to_thread(_open_sqlite, path)
            try:
                yield _SqliteReader(lite)
            finally:
                await asyncio.to_thread(_close_sqlite, lite)
            return
        async with self.engine.connect() as conn:
            if conn.dialect.name == "postgresql" and conn.dialect.driver == "asyncpg":
                raw = await _driver(conn)
                # One snapshot: the head and the rows it seals, whatever appends meanwhile.
                async with raw.transaction(isolation="repeatable_read", readonly=True):
                    yield _PostgresReader(raw)
            else:
                async with conn.begin():
                    yield _SqlAlchemyReader(conn)

    async def _verify_chain(
        self, name: str, from_seq: int | None, to_seq: int | None, cache: SignatureCache
    ) -> tuple[list[C.Finding], int]:
        async with self._reader() as reader:
            findings: list[C.Finding] = []
            head_row = await reader.head(name)
            head: C.Head | None = None
            if head_row is None:
                findings.append(
                    C.Finding(C.ALTERED, name, None, None, "the chain's sealed head is missing")
                )
            else:
                head = C.Head(int(head_row[0]), C.text_of(head_row[1]))
                leaf = C.head_leaf(name, head.seq, head.hash)
                if not C.check_seal(self.keyring, C.text_of(head_row[2]), leaf, head_row[3], cache):
                    findings.append(
                        C.Finding(
                            C.ALTERED,
                            name,
                            head.seq,
                            None,
                            "the chain's head was altered (its audit seal does not verify)",
                        )
                    )
            start = await self._start(reader, name, cache, findings)
            lo = _SEQ_MIN if from_seq is None else from_seq
            hi = _SEQ_MAX if to_seq is None else to_seq
            ranged = from_seq is not None and from_seq > start.seq + 1
            tail = head if to_seq is None or (head is not None and to_seq >= head.seq) else None
            result = C.ScanResult()
            scanner: C.Scanner | None = None
            clean = True
            async with contextlib.aclosing(reader.pages(name, lo, hi, with_id=False)) as pages:
                async for page in pages:
                    if scanner is None:
                        prev = C.text_of(page[0][1]) if ranged else start.hash
                        scanner = C.Scanner(name, prev, self.keyring, cache, result)
                    if not scanner.feed(page):
                        clean = False
                        break
            if clean and scanner is not None:
                clean = scanner.finish()
            if (
                clean
                and tail is not None
                and (result.last_hash != tail.hash or (result.last_seq or start.seq) != tail.seq)
            ):
                clean = False
            if clean and not findings:
                return [], result.count
            rows: list[C.Light] = []
            async with contextlib.aclosing(reader.pages(name, lo, hi, with_id=True)) as pages:
                async for page in pages:
                    rows += C.lights_packed(page, self.keyring, cache)
            first = rows[0] if rows else None
            origin = C.Head(first.seq - 1, first.prev) if ranged and first is not None else start
            findings += C.diagnose(name, rows, origin, tail)
            return findings, len(rows)

    async def _start(
        self, reader: _Reader, name: str, cache: SignatureCache, findings: list[C.Finding]
    ) -> C.Head:
        """Where the chain starts: its newest prune anchor (checked), else its genesis."""
        row = await reader.anchor(name)
        if row is None:
            return C.Head(0, C.genesis(name))
        seq, hash_ = int(row[0]), C.text_of(row[1])
        leaf = C.anchor_leaf(name, seq, hash_, int(row[2]))
        if not C.check_seal(self.keyring, C.text_of(row[3]), leaf, row[4], cache):
            findings.append(
                C.Finding(
                    C.ALTERED,
                    name,
                    seq,
                    None,
                    f"the prune anchor at seq {seq} was altered (its audit seal does not verify)",
                )
            )
        return C.Head(seq, hash_)

    # -- retention ------------------------------------------------------------------------

    async def prune(self, older_than_ms: int) -> list[PruneResult]:
        """Delete, per chain, the longest prefix of records recorded before ``older_than_ms``
        and leave a sealed anchor (the last pruned record's seq and hash) in its place, so the
        rest of the chain still verifies from there."""
        if self.signer is None:
            raise StoreError("pruning writes sealed anchors: open the store with the audit key")
        out = []
        for name in await self.chain_names():
            done = await self._prune_chain(name, older_than_ms)
            if done is not None:
                out.append(done)
        return out

    async def _prune_chain(self, name: str, cutoff: int) -> PruneResult | None:
        assert self.signer is not None
        async with self._writing() as conn:
            head = (
                await conn.execute(
                    sa.select(chains.c.head_seq).where(chains.c.chain == name).with_for_update()
                )
            ).first()
            if head is None:
                return None
            first_kept = (
                await conn.execute(
                    sa.select(sa.func.min(records.c.seq)).where(
                        records.c.chain == name, records.c.recorded_ms >= cutoff
                    )
                )
            ).scalar()
            last = int(head[0]) if first_kept is None else int(first_kept) - 1
            row = (
                await conn.execute(
                    sa.select(records.c.hash).where(records.c.chain == name, records.c.seq == last)
                )
            ).first()
            if row is None:
                return None  # nothing old enough (or already pruned up to there)
            deleted = await conn.execute(
                records.delete().where(records.c.chain == name, records.c.seq <= last)
            )
            count = int(deleted.rowcount or 0)
            hash_ = str(row[0])
            [sealed] = C.seal(self.signer, [C.anchor_leaf(name, last, hash_, count)])
            await conn.execute(
                anchors.insert().values(
                    chain=name,
                    seq=last,
                    hash=hash_,
                    pruned=count,
                    created_ms=now_ms(),
                    signer=self.signer.identity,
                    seal=sealed,
                )
            )
            log.info("audit chain pruned", chain=name, pruned=count, anchor_seq=last)
            return PruneResult(name, count, last)


def is_transient(exc: BaseException) -> bool:
    """A database error worth waiting out (connection lost, locked, server restarting)."""
    if isinstance(exc, StoreError):
        return not isinstance(exc.__cause__, IntegrityError)
    if isinstance(exc, OperationalError | OSError | ConnectionError | TimeoutError) or (
        isinstance(exc, DBAPIError) and exc.connection_invalidated
    ):
        return True
    import asyncpg

    # The Postgres hot paths use asyncpg directly: its connection errors, a server shutting
    # down or restarting, and a lost connection.
    return isinstance(
        exc,
        asyncpg.PostgresConnectionError
        | asyncpg.exceptions.OperatorInterventionError
        | asyncpg.InterfaceError,
    )
