"""The audit store: appending chained, sealed records; verifying chains; pruning with anchors.

Concurrency (several audit consumers, rebalances): an append is one transaction per chain
that locks the chain's head row (``SELECT … FOR UPDATE`` on Postgres; SQLite's single
writer via ``BEGIN IMMEDIATE``), drops events already recorded (unique ``(topic, dedupe)``),
numbers the rest after the head, and moves the head only if it is still where it was read
(``UPDATE … WHERE head_seq = :read``).  Two consumers briefly owning one partition therefore
serialise on the head: the second sees the first's records, skips them as duplicates and
appends the rest after them — never a fork (``(chain, seq)`` is unique as well).  A conflict
that slips through anyway (a constraint violation) rolls back and is retried.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import sqlalchemy as sa
import structlog
from alembic import command
from alembic.config import Config
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from stratamesh.audit import chain as C
from stratamesh.audit.schema import anchors, chains, records
from stratamesh.config import Settings
from stratamesh.errors import StoreError
from stratamesh.security.keys import Keyring, SigningKey
from stratamesh.security.signing import SignatureCache
from stratamesh.stores.sql import WRITE, database_url, ensure_schema, open_engine, store_error

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
# Rows fetched per round trip while verifying.
_PAGE: Final = 20_000
_ROW_COLUMNS: Final = [records.c[name] for name in C.ROW_FIELDS]


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


def _migrate(sync_conn: sa.Connection) -> None:
    cfg = Config()
    cfg.set_main_option("script_location", str(_MIGRATIONS))
    cfg.attributes["connection"] = sync_conn
    command.upgrade(cfg, "head")


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
        for attempt in range(1, _APPEND_ATTEMPTS + 1):
            try:
                async with self._writing() as conn:
                    return await self._append(conn, chain, entries)
            except (IntegrityError, _Conflict) as exc:
                if attempt == _APPEND_ATTEMPTS:
                    raise StoreError(f"chain {chain}: appends keep conflicting ({exc})") from exc
                log.info("audit chain contended, retrying", chain=chain, attempt=attempt)
                await asyncio.sleep(0.01 * attempt)
        raise AssertionError("unreachable")

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
        if head is None:
            seq0, prev = 0, C.genesis(chain)
            created = True
        else:
            seq0, prev = int(head[0]), str(head[1])
            created = False
        fresh: list[C.Entry] = []
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
        for e in entries:
            key = (e.topic, e.dedupe)
            if key not in seen:
                seen.add(key)
                fresh.append(e)
        duplicates = len(entries) - len(fresh)
        if not fresh:
            return AppendResult(0, duplicates, seq0)
        signer = self.signer.identity
        rows_out: list[dict[str, Any]] = []
        leaves: list[bytes] = []
        seq = seq0
        fields = C.CONTENT_FIELDS
        for e in fresh:
            seq += 1
            content = e.content()
            h = C.record_hash(prev, content)
            row = dict(zip(fields, content, strict=True))
            row.update(chain=chain, seq=seq, prev_hash=prev, hash=h, signer=signer)
            rows_out.append(row)
            leaves.append(bytes.fromhex(h))
            prev = h
        leaves.append(C.head_leaf(chain, seq, prev))
        seals = C.seal(self.signer, leaves)
        for row, s in zip(rows_out, seals, strict=False):
            row["seal"] = s
        now = now_ms()
        await conn.execute(records.insert(), rows_out)
        if created:
            await conn.execute(
                chains.insert().values(
                    chain=chain,
                    head_seq=seq,
                    head_hash=prev,
                    signer=signer,
                    seal=seals[-1],
                    updated_ms=now,
                )
            )
        else:
            moved = await conn.execute(
                chains.update()
                .where(chains.c.chain == chain, chains.c.head_seq == seq0)
                .values(head_seq=seq, head_hash=prev, signer=signer, seal=seals[-1], updated_ms=now)
            )
            if moved.rowcount != 1:
                raise _Conflict(f"head of {chain} moved")
        return AppendResult(len(fresh), duplicates, seq, tuple(fresh))

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

    async def _verify_chain(
        self, name: str, from_seq: int | None, to_seq: int | None, cache: SignatureCache
    ) -> tuple[list[C.Finding], int]:
        async with self.engine.connect() as conn:
            if conn.dialect.name == "postgresql":
                # One snapshot: the head and the rows it seals, whatever appends meanwhile.
                await conn.execution_options(isolation_level="REPEATABLE READ")
            async with conn.begin():
                findings: list[C.Finding] = []
                head_row = (
                    await conn.execute(
                        sa.select(
                            chains.c.head_seq, chains.c.head_hash, chains.c.signer, chains.c.seal
                        ).where(chains.c.chain == name)
                    )
                ).first()
                head: C.Head | None = None
                if head_row is None:
                    findings.append(
                        C.Finding(C.ALTERED, name, None, None, "the chain's sealed head is missing")
                    )
                else:
                    head = C.Head(int(head_row[0]), str(head_row[1]))
                    leaf = C.head_leaf(name, head.seq, head.hash)
                    if not C.check_seal(self.keyring, head_row[2], leaf, head_row[3], cache):
                        findings.append(
                            C.Finding(
                                C.ALTERED,
                                name,
                                head.seq,
                                None,
                                "the chain's head was altered (its audit seal does not verify)",
                            )
                        )
                start = await self._start(conn, name, cache, findings)
                query = sa.select(*_ROW_COLUMNS).where(records.c.chain == name)
                if from_seq is not None:
                    query = query.where(records.c.seq >= from_seq)
                if to_seq is not None:
                    query = query.where(records.c.seq <= to_seq)
                query = query.order_by(records.c.seq)
                ranged = from_seq is not None and from_seq > start.seq + 1
                tail = head if to_seq is None or (head is not None and to_seq >= head.seq) else None
                result = C.ScanResult()
                prev: str | None = None if ranged else start.hash
                clean = True
                async for page in self._pages(conn, query):
                    if prev is None:
                        prev = str(page[0][C.ROW_FIELDS.index("prev_hash")])
                    if not C.scan(page, prev, self.keyring, cache, result):
                        clean = False
                        break
                    prev = result.last_hash
                if (
                    clean
                    and tail is not None
                    and (
                        result.last_hash != tail.hash or (result.last_seq or start.seq) != tail.seq
                    )
                ):
                    clean = False
                if clean and not findings:
                    return [], result.count
                rows: list[C.Light] = []
                async for page in self._pages(conn, query):
                    rows += C.lights(page, self.keyring, cache)
                first = rows[0] if rows else None
                origin = (
                    C.Head(first.seq - 1, first.prev) if ranged and first is not None else start
                )
                findings += C.diagnose(name, rows, origin, tail)
                return findings, len(rows)

    async def _start(
        self, conn: AsyncConnection, name: str, cache: SignatureCache, findings: list[C.Finding]
    ) -> C.Head:
        """Where the chain starts: its newest prune anchor (checked), else its genesis."""
        row = (
            await conn.execute(
                sa.select(
                    anchors.c.seq,
                    anchors.c.hash,
                    anchors.c.pruned,
                    anchors.c.signer,
                    anchors.c.seal,
                )
                .where(anchors.c.chain == name)
                .order_by(anchors.c.seq.desc())
                .limit(1)
            )
        ).first()
        if row is None:
            return C.Head(0, C.genesis(name))
        seq, hash_ = int(row[0]), str(row[1])
        leaf = C.anchor_leaf(name, seq, hash_, int(row[2]))
        if not C.check_seal(self.keyring, row[3], leaf, row[4], cache):
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

    @staticmethod
    async def _pages(
        conn: AsyncConnection, query: sa.Select[Any]
    ) -> AsyncIterator[Sequence[Sequence[Any]]]:
        stream = await conn.stream(query.execution_options(yield_per=_PAGE))
        async for page in stream.partitions(_PAGE):
            yield page

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
    return isinstance(exc, OperationalError | OSError | ConnectionError | TimeoutError) or (
        isinstance(exc, DBAPIError) and exc.connection_invalidated
    )
