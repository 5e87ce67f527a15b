"""A request's path through the mesh, reconstructed from its audit records.

Every stage's event is a record, so the path is the request's records in event time:
which stage produced what, with which model and template versions, what guard decided,
how replicas voted, what judge scored, the tokens and cost, and the per-stage latencies
the events carry.  Rejected records claiming the request id are shown too (marked).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from stratamesh.audit.schema import records
from stratamesh.audit.store import AuditStore

__all__ = ["Step", "request_trace", "summary"]


@dataclass(frozen=True, slots=True)
class Step:
    record_id: int
    chain: str
    seq: int
    topic: str
    event_id: str
    event_type: str
    producer: str
    status: str
    occurred_ms: int
    since_start_ms: int
    model: str
    versions: dict[str, str]
    detail: dict[str, Any]
    input_tokens: int
    output_tokens: int
    cost_usd: float
    billed: bool
    replay: str

    @property
    def summary(self) -> str:
        return summary(self.event_type, self.status, self.detail)

    def as_dict(self) -> dict[str, Any]:
        return {
            "record_id": self.record_id,
            "chain": self.chain,
            "seq": self.seq,
            "topic": self.topic,
            "event_id": self.event_id,
            "event_type": self.event_type,
            "producer": self.producer,
            "status": self.status,
            "occurred_ms": self.occurred_ms,
            "since_start_ms": self.since_start_ms,
            "model": self.model,
            "versions": self.versions,
            "detail": self.detail,
            "tokens": {"input": self.input_tokens, "output": self.output_tokens},
            "cost_usd": self.cost_usd,
            "billed": self.billed,
            "replay": self.replay or None,
            "summary": self.summary,
        }


def _scores(scores: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.2f}" for k, v in sorted(scores.items()))


def _verdicts(findings: list[dict[str, Any]]) -> str:
    flagged = [f"{f['scanner']}:{f['verdict']}" for f in findings if f.get("verdict") != "pass"]
    return ("guard " + ", ".join(flagged)) if flagged else ("guard pass" if findings else "")


def summary(event_type: str, status: str, d: dict[str, Any]) -> str:
    """One line on what a stage decided (no text of the request: only metadata)."""
    if status != "ok":
        return f"{status}: {d.get('reason', '')}"
    parts: list[str] = []
    if event_type == "RequestAdmitted":
        parts += [_verdicts(d.get("findings", [])), f"pseudonyms={d.get('pseudonyms', 0)}"]
    elif event_type == "RequestRouted":
        parts.append(f"tier={d.get('tier')}")
        slip = d.get("slip") or {}
        if slip:
            parts.append("slip=" + ">".join(slip.get("stages", [])))
        if "cache_hit" in d:
            parts.append(f"cache {d['cache_hit']['kind']}")
    elif event_type == "ContextRetrieved":
        parts.append(f"{len(d.get('chunks', []))} chunks from {d.get('collection')}")
    elif event_type == "CandidateAnswer":
        parts += [f"replica={d.get('replica')}", f"round={d.get('round', 0)}"]
        if d.get("degradation") not in (None, "full"):
            parts.append(f"degraded={d['degradation']}")
    elif event_type == "AnswerDecided":
        parts.append(
            f"{d.get('mode')} votes {d.get('votes_for')}/{d.get('votes_total')}"
            f" of {d.get('replicas_expected')}"
        )
        if d.get("dissent"):
            parts.append(f"dissent={len(d['dissent'])}")
    elif event_type == "AnswerJudged":
        parts += [_scores(d.get("scores", {})), "passed" if d.get("passed") else "failed"]
    elif event_type == "RequestCompleted":
        parts += [f"status={d.get('status')}", _scores(d.get("scores", {}))]
        parts.append(_verdicts(d.get("findings", [])))
        if d.get("cached"):
            parts.append("cached")
    elif event_type == "HumanReviewRequested":
        parts.append(f"escalated: {d.get('reason', '')}")
    elif event_type == "HumanReviewDecided":
        parts.append(f"{d.get('decision')} by {d.get('reviewer')}")
    elif event_type == "InferenceRequested":
        parts.append(f"task={d.get('task')} prompt_chars={d.get('prompt_chars')}")
    return " ".join(p for p in parts if p)


async def request_trace(
    store: AuditStore, request_id: str, *, tenant: str | None = None
) -> list[Step]:
    """The request's records in event time (then append order)."""
    cols = [
        records.c.id,
        records.c.chain,
        records.c.seq,
        records.c.topic,
        records.c.event_id,
        records.c.event_type,
        records.c.producer,
        records.c.status,
        records.c.occurred_ms,
        records.c.model,
        records.c.versions,
        records.c.detail,
        records.c.input_tokens,
        records.c.output_tokens,
        records.c.cost_usd,
        records.c.billed,
        records.c.replay,
    ]
    query = sa.select(*cols).where(records.c.request_id == request_id)
    if tenant is not None:
        query = query.where(records.c.tenant == tenant)
    query = query.order_by(records.c.occurred_ms, records.c.id)
    async with store.engine.connect() as conn:
        rows = (await conn.execute(query)).all()
    start = int(rows[0][8]) if rows else 0
    return [
        Step(
            record_id=int(r[0]),
            chain=r[1],
            seq=int(r[2]),
            topic=r[3],
            event_id=r[4],
            event_type=r[5],
            producer=r[6],
            status=r[7],
            occurred_ms=int(r[8]),
            since_start_ms=int(r[8]) - start,
            model=r[9],
            versions=json.loads(r[10] or "{}"),
            detail=json.loads(r[11] or "{}"),
            input_tokens=int(r[12]),
            output_tokens=int(r[13]),
            cost_usd=float(r[14]),
            billed=bool(r[15]),
            replay=r[16],
        )
        for r in rows
    ]
