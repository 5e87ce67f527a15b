"""The audit service on the real broker: a request's events flow through their topics, audit
records each once (signed, chained), `trace` rebuilds the path, the ledger bills the model
calls and not their replayed copies; a forged record is recorded as rejected, not
dead-lettered; an expired event is recorded, not answered.  SQLite and (when
STRATA_DATABASE_URL is set) Postgres."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from aiokafka import AIOKafkaProducer

from stratamesh.audit.ledger import cost_report
from stratamesh.audit.schema import records
from stratamesh.audit.store import AuditStore
from stratamesh.audit.trace import request_trace
from stratamesh.bus import headers as H
from stratamesh.bus import topics as T
from stratamesh.bus.replay import copy_range
from stratamesh.config import Settings
from stratamesh.events import (
    AnswerDecided,
    AnswerJudged,
    CandidateAnswer,
    ConsensusMode,
    Cost,
    GuardFinding,
    GuardVerdict,
    InferenceRequested,
    RequestAdmitted,
    RequestCompleted,
    RequestRouted,
)
from stratamesh.events.testing import sample_event
from stratamesh.services.audit.app import build_service
from tests.integration.conftest import Env
from tests.integration.test_audit_store import BACKENDS, backend_settings, drop_backend
from tests.integration.test_bus import read_all


@pytest.fixture(params=BACKENDS)
async def audit_env(env: Env, request: pytest.FixtureRequest) -> AsyncIterator[Env]:
    env.settings = backend_settings(env.settings, request.param)
    yield env
    for svc in env.services:  # stop before the schema goes
        await svc.stop()
    env.services.clear()
    await drop_backend(env.settings)


async def wait_for(settings: Settings, count: int, timeout: float = 60.0) -> AuditStore:
    store = await AuditStore.open(settings)
    deadline = time.monotonic() + timeout
    n = 0
    while time.monotonic() < deadline:
        async with store.engine.connect() as conn:
            n = int((await conn.execute(sa.select(sa.func.count()).select_from(records))).scalar())
        if n >= count:
            return store
        await asyncio.sleep(0.2)
    await store.close()
    raise AssertionError(f"audit recorded {n} of {count} records in {timeout} s")


def at(base: datetime, ms: int) -> datetime:
    return base + timedelta(milliseconds=ms)


async def test_a_request_is_audited_traced_and_billed(audit_env: Env, unique: str) -> None:
    env = audit_env
    client = await env.publisher(env.client(f"web-{unique}", "acme"))
    guard = await env.publisher("guard")
    route = await env.publisher("route")
    replicas = [await env.publisher("infer"), await env.publisher("infer.r2")]
    consensus = await env.publisher("consensus")
    judge = await env.publisher("judge")
    await env.start(build_service(env.settings), env.settings)

    rid = f"req-{unique}"
    base = datetime.now(UTC).replace(microsecond=0)
    common: dict[str, Any] = {"tenant": "acme", "request_id": rid}

    def ev(cls: Any, ms: int, **kw: Any) -> Any:
        return sample_event(
            cls, event_id=str(uuid.uuid4()), occurred_at=at(base, ms), **common, **kw
        )

    await client.publish(ev(InferenceRequested, 0, prompt="Where does Jane Doe live?"))
    finding = GuardFinding(
        scanner="pii", score=0.9, threshold=0.5, verdict=GuardVerdict.REDACT, guard_version="g1"
    )
    await guard.publish(ev(RequestAdmitted, 5, guard_version="g1", findings=[finding]))
    routed = ev(RequestRouted, 10)
    # Its deadline passed before audit reads it: recorded, never answered with `expired`.
    await route.publish(routed, deadline_ms=int(time.time() * 1000) - 1000)
    candidates = []
    for k, pub in enumerate(replicas):
        c = ev(
            CandidateAnswer,
            100 + k,
            replica_id=pub.identity,
            model="smollm2",
            revision="r1",
            template_version="qa@3",
            answer="Somewhere private.",
            cost=Cost(input_tokens=100 + k, output_tokens=20, cost_usd=0.5),
        )
        candidates.append(c)
        await pub.publish(c, next_stage="consensus")
    await replicas[0].publish(candidates[0], next_stage="consensus")  # a redelivered copy
    await consensus.publish(
        ev(
            AnswerDecided,
            200,
            model="smollm2@r1",
            mode=ConsensusMode.MAJORITY,
            answer="Somewhere private.",
            answer_digest="d" * 64,
            votes_for=2,
            votes_total=2,
            replicas_expected=2,
            cost=Cost(input_tokens=201, output_tokens=40, cost_usd=1.0),
        )
    )
    await judge.publish(
        ev(
            AnswerJudged,
            300,
            model="smollm2@r1",
            faithfulness=0.9,
            relevance=0.8,
            citation_score=1.0,
            passed=True,
            answer="Somewhere private.",
            cost=Cost(input_tokens=201, output_tokens=40, cost_usd=1.0),
        )
    )
    await guard.publish(
        ev(RequestCompleted, 400, status="ok", answer="Somewhere private.", model="smollm2@r1"),
        topic_name=T.RESULTS,
    )
    # A forged result: claims to be guard's, carries no signature.
    raw = AIOKafkaProducer(bootstrap_servers=env.settings.bootstrap_servers)
    await raw.start()
    try:
        await raw.send_and_wait(
            T.RESULTS,
            b"not avro",
            key=rid.encode(),
            headers=[
                (H.EVENT_TYPE, b"RequestCompleted"),
                (H.EVENT_ID, str(uuid.uuid4()).encode()),
                (H.REQUEST_ID, rid.encode()),
                (H.TENANT, b"acme"),
                (H.PRODUCER, b"guard"),
            ],
        )
    finally:
        await raw.stop()
    # An operator replays the candidates into the shadow namespace, which an audit of its
    # own records (`strata replay copy inference.completed` + `strata run audit --shadow`).
    copied = await copy_range(env.settings, T.INFERENCE_COMPLETED)
    assert copied.total == 3
    await env.start(build_service(env.settings).variant(shadow=True), env.settings)

    # 8 events + 1 rejected + 2 replayed copies (the redelivered one collapses again).
    store = await wait_for(env.settings, 11)
    try:
        await asyncio.sleep(1.0)  # anything extra (a duplicate) would show up by now
        steps = await request_trace(store, rid)
        live = [s for s in steps if not s.replay and s.status == "ok"]
        assert [s.event_type for s in live] == [
            "InferenceRequested",
            "RequestAdmitted",
            "RequestRouted",
            "CandidateAnswer",
            "CandidateAnswer",
            "AnswerDecided",
            "AnswerJudged",
            "RequestCompleted",
        ]
        assert [s.producer for s in live] == [
            f"client:web-{unique}",
            "guard",
            "route",
            "infer",
            "infer.r2",
            "consensus",
            "judge",
            "guard",
        ]
        assert [s.since_start_ms for s in live] == [0, 5, 10, 100, 101, 200, 300, 400]
        admitted, cand = live[1], live[3]
        assert admitted.detail["findings"][0]["verdict"] == "redact"
        assert cand.model == "smollm2@r1" and cand.versions["template"] == "qa@3"
        assert live[5].summary.startswith("majority votes 2/2")
        assert live[6].detail["scores"]["faithfulness"] == 0.9
        assert [s.billed for s in live] == [False, False, False, True, True, False, False, False]
        [rejected] = [s for s in steps if s.status != "ok"]
        assert rejected.status == "rejected:security" and rejected.event_type == "RequestCompleted"
        replays = [s for s in steps if s.replay]
        assert len(replays) == 2 and not any(s.billed for s in replays)
        assert {s.chain.split("/")[0] for s in replays} == {"shadow.inference.completed"}
        # No prompt or answer text anywhere in the trail.
        async with store.engine.connect() as conn:
            dump = " ".join(str(r) for r in await conn.execute(sa.select(records)))
        assert "Jane" not in dump and "Somewhere private" not in dump

        bill = await cost_report(store, tenant="acme", by=["tenant", "model"])
        [line] = bill.lines
        assert line.group == {"tenant": "acme", "model": "smollm2@r1"}
        assert (line.calls, line.input_tokens, line.output_tokens) == (2, 201, 40)
        assert line.cost_usd == pytest.approx(1.0)
        assert bill.replayed_calls == 2 and bill.replayed_cost_usd == pytest.approx(1.0)

        report = await store.verify()
        assert report.ok, report.findings
        assert report.records == 11
    finally:
        await store.close()
    # Audit answered nothing: the results topic holds the result and the forged record only.
    results = await read_all(env.settings, T.RESULTS, 2, timeout=3)
    assert len(results) == 2
