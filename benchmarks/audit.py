"""The audit store: sustained append rate with chaining and seals, and verification speed.

    python benchmarks/audit.py [--records N] [--batch B] [--database-url URL] [--output FILE]

Append: the audit service's own per-record work, timed end to end — each event's record is
built from the decoded event (``services/audit/records.py``: metadata, digests, canonical
JSON), then appended in batches of ``--batch`` (one transaction, one Ed25519 seal per batch,
deduplication lookup, head update) to 6 chains in turn, as one audit consumer owning 6
partitions does.  The events are a realistic mix of request-plane events (candidate
answers with costs, decisions, judgements, results), decoded beforehand.

Verify: ``AuditStore.verify()`` over everything appended (every content hash recomputed,
every link and seal checked, heads compared), reported as records/s and seconds per
million records.

Postgres runs when ``--database-url`` or STRATA_DATABASE_URL is set (in a throw-away
schema); SQLite always (a temporary file).  Prints one JSON object on the last line:
``postgres`` and ``sqlite``, each with ``append_per_s``, ``verify_per_s``,
``verify_s_per_million``, ``records``, ``batch``; and ``machine``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from _report import emit, machine
from stratamesh.audit.store import AuditStore, chain_name
from stratamesh.bus.envelope import Envelope
from stratamesh.config import Settings
from stratamesh.events import (
    AnswerDecided,
    AnswerJudged,
    CandidateAnswer,
    Cost,
    Event,
    RequestCompleted,
)
from stratamesh.events.testing import sample_event
from stratamesh.security.keys import generate_identity
from stratamesh.services.audit.records import entry_of_event
from stratamesh.stores.sql import open_engine

PARTITIONS = 6
TOPICS = {
    "CandidateAnswer": "inference.completed",
    "AnswerDecided": "requests.decided",
    "AnswerJudged": "requests.judged",
    "RequestCompleted": "results",
}


@dataclass(frozen=True, slots=True)
class Rec:
    """The parts of a consumed record the audit reads."""

    topic: str
    partition: int
    offset: int
    timestamp: int
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]]


def pool(size: int) -> list[Event]:
    now = datetime.now(UTC)
    base: dict[str, Any] = {"tenant": "acme", "occurred_at": now}
    cost = Cost(input_tokens=812, output_tokens=96, cost_usd=0.00042)
    kinds = [
        lambda r: sample_event(
            CandidateAnswer,
            request_id=r,
            model="smollm2",
            revision="r1",
            template_version="qa@3",
            answer="An answer of a few sentences. " * 4,
            cost=cost,
            stage_latency_ms={"guard_in": 2.1, "route": 1.4, "retrieve": 12.0, "infer": 840.0},
            **base,
        ),
        lambda r: sample_event(
            AnswerDecided, request_id=r, model="smollm2@r1", votes_for=2, votes_total=3, **base
        ),
        lambda r: sample_event(
            AnswerJudged,
            request_id=r,
            model="smollm2@r1",
            faithfulness=0.91,
            relevance=0.77,
            citation_score=1.0,
            passed=True,
            **base,
        ),
        lambda r: sample_event(
            RequestCompleted, request_id=r, status="ok", scores={"faithfulness": 0.91}, **base
        ),
    ]
    return [kinds[i % len(kinds)](f"req-{i // 4}") for i in range(size)]


async def run_backend(
    settings: Settings, events: list[Event], n: int, batch: int
) -> dict[str, Any]:
    key = generate_identity(settings.keys_dir, "audit", overwrite=True)
    store = await AuditStore.open(settings, signer=key)
    value = b"\xc3\x01" + bytes(300)  # an event's bytes: only hashed
    try:
        offsets = [0] * PARTITIONS
        started = time.perf_counter()
        done = 0
        k = 0
        while done < n:
            p = k % PARTITIONS
            k += 1
            size = min(batch, n - done)
            entries = []
            recorded = time.time_ns() // 1_000_000
            for j in range(size):
                ev = events[(done + j) % len(events)]
                topic = TOPICS[ev.EVENT_TYPE]
                rec = Rec(topic, p, offsets[p], recorded, None, value, [])
                offsets[p] += 1
                env = Envelope(
                    event_type=ev.EVENT_TYPE,
                    event_id=str(uuid.uuid4()),  # every record a distinct event
                    request_id=getattr(ev, "request_id", None),
                    doc_id=None,
                    tenant="acme",
                    producer="infer",
                    deadline_ms=None,
                    next_stage=None,
                    traceparent=None,
                    attempt=1,
                    replay=None,
                    unsigned_ingress=False,
                )
                entries.append(entry_of_event(ev, env, rec, f"bench.{p}", recorded))
            # One partition's batch is one chain (here: one per partition, mixed types).
            await store.append(chain_name("bench", p), entries)
            done += size
        append_s = time.perf_counter() - started
        report = await store.verify()
        assert report.ok, report.findings[:3]
        assert report.records == n, (report.records, n)
        return {
            "records": n,
            "batch": batch,
            "append_s": round(append_s, 3),
            "append_per_s": round(n / append_s, 1),
            "verify_s": round(report.seconds, 3),
            "verify_per_s": round(n / report.seconds, 1),
            "verify_s_per_million": round(report.seconds * 1_000_000 / n, 2),
        }
    finally:
        await store.close()


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    events = pool(400)
    out: dict[str, Any] = {}
    url = args.database_url or os.environ.get("STRATA_DATABASE_URL")
    with tempfile.TemporaryDirectory() as home:
        if url:
            schema = f"audit_bench_{uuid.uuid4().hex[:10]}"
            base = Settings(home=Path(home) / "pg", database_url=url)
            settings = base.model_copy(
                update={"audit": base.audit.model_copy(update={"db_schema": schema})}
            )
            try:
                out["postgres"] = await run_backend(settings, events, args.records, args.batch)
            finally:
                engine = open_engine(base)
                async with engine.begin() as conn:
                    await conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
                await engine.dispose()
        else:
            out["postgres"] = None
        settings = Settings(home=Path(home) / "lite", database_url=None)
        out["sqlite"] = await run_backend(settings, events, args.records, args.batch)
    out["targets"] = {"postgres_append_per_s": 5000, "verify_per_s": 200_000}
    out["machine"] = machine()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--records", type=int, default=100_000)
    ap.add_argument("--batch", type=int, default=256, help="records per append (and seal)")
    ap.add_argument("--database-url", default=None, help="Postgres URL (else the env's)")
    ap.add_argument("--output", type=Path, default=None)
    args = ap.parse_args()
    emit(asyncio.run(main_async(args)), args.output)


if __name__ == "__main__":
    main()
