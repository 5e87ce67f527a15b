"""The audit store on real databases: SQLite always, Postgres too when STRATA_DATABASE_URL is
set (CI) — each test in its own Postgres schema, dropped afterwards.

Tampering is done the way an intruder with database access would: plain SQL on the tables.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from stratamesh.audit import chain as C
from stratamesh.audit.ledger import cost_report
from stratamesh.audit.schema import RECORDS_TABLE
from stratamesh.audit.store import AuditStore
from stratamesh.config import Settings
from stratamesh.errors import StoreError
from stratamesh.security.keys import generate_identity, load_signing_key
from stratamesh.stores.sql import open_engine

BACKENDS = ["sqlite"] + (["postgres"] if os.environ.get("STRATA_DATABASE_URL") else [])


def backend_settings(base: Settings, backend: str) -> Settings:
    """``base`` on SQLite (under its home), or on STRATA_DATABASE_URL in a fresh schema."""
    if backend == "sqlite":
        return base.model_copy(update={"database_url": None})
    schema = f"audit_test_{uuid.uuid4().hex[:12]}"
    audit = base.audit.model_copy(update={"db_schema": schema})
    return base.model_copy(
        update={"database_url": os.environ["STRATA_DATABASE_URL"], "audit": audit}
    )


async def drop_backend(settings: Settings) -> None:
    schema = settings.audit.db_schema
    if settings.database_url and schema:
        engine = open_engine(settings.model_copy(update={"audit": Settings().audit}))
        async with engine.begin() as conn:
            await conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        await engine.dispose()


@pytest.fixture(params=BACKENDS)
async def audit_settings(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Settings]:
    settings = backend_settings(Settings(home=tmp_path / "home"), request.param)
    generate_identity(settings.keys_dir, "audit")
    yield settings
    await drop_backend(settings)


@pytest.fixture
async def store(audit_settings: Settings) -> AsyncIterator[AuditStore]:
    s = await AuditStore.open(audit_settings, signer=load_signing_key(audit_settings, "audit"))
    yield s
    await s.close()


def entries(
    n: int, *, topic: str = "inference.completed", start: int = 0, **kw: Any
) -> list[C.Entry]:
    out = []
    for i in range(start, start + n):
        fields: dict[str, Any] = {
            "topic": topic,
            "kafka_partition": 0,
            "kafka_offset": i,
            "dedupe": f"ev-{i}",
            "event_id": f"ev-{i}",
            "event_type": "CandidateAnswer",
            "request_id": f"req-{i // 3}",
            "tenant": "acme" if i % 2 else "globex",
            "producer": "infer",
            "occurred_ms": 1_700_000_000_000 + i,
            "recorded_ms": 1_700_000_000_000 + i,
            "model": "smollm2@r1" if i % 4 else "qwen@r2",
            "input_tokens": 10,
            "output_tokens": 5,
            "cost_usd": 0.25,
            "billed": 1,
            "event_hash": f"{i:064x}",
        }
        fields.update(kw)
        out.append(C.Entry(**fields))
    return out


async def sql(store: AuditStore, text: str, **params: Any) -> None:
    async with store.engine.begin() as conn:
        await conn.execute(sa.text(text), params)


CHAIN = "inference.completed/0"


async def test_appends_chain_and_verify(store: AuditStore) -> None:
    for start in range(0, 30, 10):
        res = await store.append(CHAIN, entries(10, start=start))
        assert res.added == 10 and res.duplicates == 0 and res.head_seq == start + 10
    report = await store.verify()
    assert report.ok and report.records == 30 and report.chains == 1


async def test_redelivery_creates_no_duplicates_and_keeps_the_chain_valid(
    store: AuditStore,
) -> None:
    batch = entries(8)
    await store.append(CHAIN, batch)
    # The same records again (a crash before the commit), mixed with new ones, and a copy
    # inside one batch.
    again = await store.append(CHAIN, batch[4:] + entries(3, start=8) + entries(1, start=9))
    assert (again.added, again.duplicates, again.head_seq) == (3, 5, 11)
    async with store.engine.connect() as conn:
        count = (await conn.execute(sa.text(f"SELECT count(*) FROM {RECORDS_TABLE}"))).scalar()
    assert count == 11
    assert (await store.verify()).ok


async def test_a_replayed_copy_is_a_record_of_its_own(store: AuditStore) -> None:
    [original] = entries(1)
    replayed = C.Entry(**{f: getattr(original, f) for f in C.CONTENT_FIELDS})
    replayed.replay, replayed.dedupe, replayed.billed = "r-1", "ev-0@r-1", 0
    assert (await store.append(CHAIN, [original, replayed])).added == 2
    assert (await store.append(CHAIN, [replayed])).duplicates == 1


async def test_tampering_is_found_and_located(store: AuditStore) -> None:
    await store.append(CHAIN, entries(10))
    await store.append(CHAIN, entries(10, start=10))
    await store.append("inference.completed/1", entries(5, start=20, kafka_partition=1))
    ids = {}
    async with store.engine.connect() as conn:
        for rid, seq in await conn.execute(
            sa.text(f"SELECT id, seq FROM {RECORDS_TABLE} WHERE chain = :c"), {"c": CHAIN}
        ):
            ids[int(seq)] = int(rid)
    # altered: a cheaper bill; removed: seq 9; swapped: seq 14 and 15 exchange places.
    await sql(store, f"UPDATE {RECORDS_TABLE} SET cost_usd = 0 WHERE id = :i", i=ids[3])
    await sql(store, f"DELETE FROM {RECORDS_TABLE} WHERE id = :i", i=ids[9])
    await sql(store, f"UPDATE {RECORDS_TABLE} SET seq = -1 WHERE id = :i", i=ids[14])
    await sql(store, f"UPDATE {RECORDS_TABLE} SET seq = 14 WHERE id = :i", i=ids[15])
    await sql(store, f"UPDATE {RECORDS_TABLE} SET seq = 15 WHERE id = :i", i=ids[14])
    report = await store.verify()
    got = sorted((f.kind, f.seq, f.record_id) for f in report.findings)
    assert got == [
        (C.ALTERED, 3, ids[3]),
        (C.REMOVED, 9, ids[10]),
        (C.REORDERED, 14, ids[15]),
        (C.REORDERED, 15, ids[14]),
    ]
    assert {f.chain for f in report.findings} == {CHAIN}  # the other chain is intact
    assert (await store.verify(["inference.completed/1"])).ok


async def test_an_inserted_record_and_a_truncated_tail_are_found(store: AuditStore) -> None:
    await store.append(CHAIN, entries(6))
    cols = ", ".join(("chain", "seq", *C.CONTENT_FIELDS, "prev_hash", "hash", "signer", "seal"))
    # A forged record squeezed in at seq 4 (the rest moved up), without the audit key.
    await sql(store, f"UPDATE {RECORDS_TABLE} SET seq = seq + 100 WHERE seq >= 4")
    await sql(store, f"UPDATE {RECORDS_TABLE} SET seq = seq - 99 WHERE seq >= 100")
    await sql(
        store,
        f"INSERT INTO {RECORDS_TABLE} ({cols}) SELECT chain, 4, topic, kafka_partition, "
        "kafka_offset, 'forged', event_id, event_type, request_id, doc_id, tenant, producer, "
        "replay, status, occurred_ms, recorded_ms, model, versions, detail, input_tokens, "
        "output_tokens, cost_usd, billed, event_hash, hash, hash, signer, seal "
        f"FROM {RECORDS_TABLE} WHERE seq = 3",
    )
    await sql(store, f"DELETE FROM {RECORDS_TABLE} WHERE seq = 7")  # the last record
    report = await store.verify()
    got = sorted((f.kind, f.seq) for f in report.findings)
    assert got == [(C.INSERTED, 4), (C.REMOVED, 7)]


async def test_two_writers_on_one_chain_never_fork_it(audit_settings: Settings) -> None:
    key = load_signing_key(audit_settings, "audit")
    a = await AuditStore.open(audit_settings, signer=key)
    b = await AuditStore.open(audit_settings, signer=key)
    try:
        # Both own the partition for a moment (a rebalance): overlapping redeliveries.
        batches = [entries(20, start=s) for s in range(0, 100, 10)]
        await asyncio.gather(
            *(
                (a if i % 2 else b).append(CHAIN, batch)
                for i, batch in enumerate(batches + batches[::-1])
            )
        )
        async with a.engine.connect() as conn:
            rows = (
                await conn.execute(sa.text(f"SELECT seq, dedupe FROM {RECORDS_TABLE} ORDER BY seq"))
            ).all()
        assert [int(r[0]) for r in rows] == list(range(1, 111))
        assert len({r[1] for r in rows}) == 110
        assert (await a.verify()).ok
    finally:
        await a.close()
        await b.close()


async def test_pruning_leaves_a_verifiable_chain_behind_a_signed_anchor(store: AuditStore) -> None:
    await store.append(CHAIN, entries(10, recorded_ms=1_000))
    await store.append(CHAIN, entries(5, start=10, recorded_ms=5_000))
    [done] = await store.prune(older_than_ms=2_000)
    assert (done.pruned, done.anchor_seq) == (10, 10)
    report = await store.verify()
    assert report.ok and report.records == 5
    await store.append(CHAIN, entries(2, start=15))  # the chain goes on after a prune
    assert (await store.verify()).ok
    assert await store.prune(older_than_ms=2_000) == []  # nothing more to prune
    # Deleting the next record and moving the anchor up is found: the anchor is sealed.
    await sql(store, f"DELETE FROM {RECORDS_TABLE} WHERE seq = 11")
    await sql(store, "UPDATE audit_anchors SET seq = 11")
    kinds = {f.kind for f in (await store.verify()).findings}
    assert C.ALTERED in kinds


async def test_the_ledger_bills_model_calls_not_replays(store: AuditStore) -> None:
    billed = entries(8)  # 4 acme, 4 globex; models: qwen for i in {0,4}, smollm2 otherwise
    replay = entries(2, start=100, replay="r-9", billed=0, tenant="acme")
    total = entries(1, start=200, event_type="RequestCompleted", billed=0, tenant="acme")
    await store.append(CHAIN, billed + replay + total)
    report = await cost_report(store, by=["tenant"])
    assert {x.group["tenant"]: (x.calls, x.cost_usd) for x in report.lines} == {
        "acme": (4, 1.0),
        "globex": (4, 1.0),
    }
    assert (report.replayed_calls, report.replayed_cost_usd) == (2, 0.5)
    by_model = await cost_report(store, by=["model"], tenant="acme")
    assert {x.group["model"]: x.input_tokens for x in by_model.lines} == {"smollm2@r1": 40}
    one = await cost_report(store, by=["request"], request_id="req-1")
    assert [(x.group["request"], x.calls, x.output_tokens) for x in one.lines] == [("req-1", 3, 15)]
    window = await cost_report(
        store, since_ms=1_700_000_000_002, until_ms=1_700_000_000_004, by=["tenant"]
    )
    assert window.total.calls == 2


async def test_migrations_are_idempotent(audit_settings: Settings) -> None:
    for _ in range(2):
        s = await AuditStore.open(audit_settings)
        await s.migrate()
        await s.close()


async def test_an_unreachable_database_says_how_to_fix_it(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path, database_url="postgresql+asyncpg://nobody@127.0.0.1:1/none")
    with pytest.raises(StoreError, match="start Postgres or fix STRATA_DATABASE_URL"):
        await AuditStore.open(settings)


async def test_a_store_without_the_audit_key_cannot_append(audit_settings: Settings) -> None:
    s = await AuditStore.open(audit_settings)
    try:
        with pytest.raises(StoreError, match="read-only"):
            await s.append(CHAIN, entries(1))
    finally:
        await s.close()


async def test_ranges_and_prunes_that_cut_a_sealed_batch_still_verify(store: AuditStore) -> None:
    for start in range(0, 30, 10):  # three sealed batches of ten
        batch = entries(10, start=start)
        for e in batch:
            e.recorded_ms = 1_000 + e.kafka_offset  # seq - 1
        await store.append(CHAIN, batch)
    for lo, hi in ((5, 25), (1, 30), (14, 14), (21, None)):
        report = await store.verify(from_seq=lo, to_seq=hi)
        assert report.ok, (lo, hi, report.findings)
        assert report.records == (hi or 30) - lo + 1
    [done] = await store.prune(older_than_ms=1_015)  # seq 1..15: the second batch is cut
    assert done.anchor_seq == 15
    report = await store.verify()
    assert report.ok and report.records == 15
    await sql(store, f"UPDATE {RECORDS_TABLE} SET tenant = 'x' WHERE seq = 17")
    [f] = (await store.verify(from_seq=16, to_seq=20)).findings
    assert (f.kind, f.seq) == (C.ALTERED, 17)
