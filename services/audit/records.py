"""Event → audit record content: metadata and hashes only, never prompt text or PII.

What a record keeps of an event: ids, tenant, producer, the topic position, model and
template versions, guard verdicts (scanner, verdict, score — not the matched text), votes,
scores, tokens, cost, per-stage latencies, and SHA-256 digests where content matters for
later comparison (the answer, the document).  Not kept: prompts, messages, answers,
critiques, chunk texts, titles, client metadata values, principals (who asked), source URIs.

What is billed (:attr:`Entry.billed`): a cost is booked where it is *incurred*, once — each
CandidateAnswer is one model call (every replica, every revision round).  Downstream events
carry cumulative totals (AnswerDecided sums the counted candidates, AnswerJudged adds the
rubric, RequestCompleted is the request's total): recorded for the trace, never billed again.
Replayed events (``strata-replay``) are recorded but never billed.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any, Final

from stratamesh.audit.chain import Entry
from stratamesh.bus.envelope import Envelope
from stratamesh.bus.middleware import InRecord
from stratamesh.events import (
    AnswerDecided,
    AnswerJudged,
    CandidateAnswer,
    ChunksEmbedded,
    ChunksIndexed,
    ContextRetrieved,
    DocumentChunked,
    DocumentRejected,
    DocumentSubmitted,
    Event,
    GuardFinding,
    HumanReviewDecided,
    HumanReviewRequested,
    InferenceRequested,
    KnowledgeEvent,
    QueryEmbedded,
    RequestAdmitted,
    RequestCompleted,
    RequestEvent,
    RequestRouted,
    RoutingSlip,
)

__all__ = ["REJECTED", "entry_of_event", "entry_of_rejected", "json_text"]

REJECTED: Final = "rejected"
# Reasons and notes written by the mesh itself; truncated so a record stays small.
_REASON_CHARS: Final = 200

_dumps = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode


def json_text(value: Mapping[str, Any]) -> str:
    """Canonical JSON (sorted keys, compact): the same text for the same metadata."""
    return _dumps(value)


def _digest(text: str | None) -> str | None:
    return hashlib.sha256(text.encode()).hexdigest() if text is not None else None


def _findings(findings: list[GuardFinding]) -> list[dict[str, Any]]:
    return [
        {
            "scanner": f.scanner,
            "verdict": f.verdict.value,
            "score": round(f.score, 4),
            "threshold": f.threshold,
            "category": f.category,
        }
        for f in findings
    ]


def _slip(slip: RoutingSlip | None) -> dict[str, Any] | None:
    if slip is None:
        return None
    return {"stages": [s.stage for s in slip.stages], "at": slip.current}


def _short(text: str | None) -> str | None:
    return None if text is None else text[:_REASON_CHARS]


def _model_of(event: Event) -> str:
    if isinstance(event, CandidateAnswer):
        if "@" in event.model or not event.revision:
            return event.model
        return f"{event.model}@{event.revision}"
    if isinstance(event, AnswerDecided | AnswerJudged):
        return event.model
    if isinstance(event, RequestCompleted):
        return event.model or ""
    if isinstance(event, RequestRouted):
        return event.route.model
    if isinstance(event, QueryEmbedded | ChunksEmbedded | ChunksIndexed | ContextRetrieved):
        return event.embed_model
    return ""


def _detail(event: Event) -> dict[str, Any]:
    d: dict[str, Any] = {}
    if isinstance(event, RequestEvent):
        d["priority"] = event.priority.value
        if event.stage_latency_ms:
            d["latency_ms"] = {k: round(v, 3) for k, v in event.stage_latency_ms.items()}
    if isinstance(event, InferenceRequested):
        d.update(
            task=event.task,
            prompt_chars=len(event.prompt),
            messages=len(event.messages),
            response_format=event.response_format is not None,
        )
    elif isinstance(event, RequestAdmitted):
        d.update(
            task=event.query.task,
            guard_version=event.guard_version,
            pseudonyms=event.pseudonym_count,
            findings=_findings(event.findings),
        )
    elif isinstance(event, RequestRouted):
        r = event.route
        d.update(
            slip=_slip(event.slip),
            tier=r.tier.value,
            adapter=r.adapter,
            template=r.template_version,
            consensus={"mode": r.consensus.mode.value, "replicas": r.consensus.replicas},
            judge={"enabled": r.judge.enabled, "threshold": r.judge.threshold},
            retrieval={"enabled": r.retrieval.enabled, "top_k": r.retrieval.top_k},
            classification={k: round(v, 4) for k, v in r.classification.items()},
        )
        if event.cache_hit is not None:
            d["cache_hit"] = {
                "kind": event.cache_hit.kind,
                "similarity": round(event.cache_hit.similarity, 4),
                "source_request_id": event.cache_hit.source_request_id,
            }
    elif isinstance(event, QueryEmbedded):
        d.update(slip=_slip(event.slip), dim=event.dim)
    elif isinstance(event, ContextRetrieved):
        d.update(
            slip=_slip(event.slip),
            collection=event.collection,
            chunks=[
                {
                    "chunk": c.chunk_id,
                    "doc": c.doc_id,
                    "v": c.doc_version,
                    "score": round(c.score, 4),
                }
                for c in event.context
            ],
        )
    elif isinstance(event, CandidateAnswer):
        d.update(
            slip=_slip(event.slip),
            replica=event.replica_id,
            adapter=event.adapter,
            template=event.template_version,
            seed=event.seed,
            sampling={
                "temperature": event.sampling.temperature,
                "top_p": event.sampling.top_p,
                "max_tokens": event.sampling.max_tokens,
            },
            degradation=event.degradation,
            round=event.revision_round,
            ttft_ms=event.ttft_ms,
            citations=len(event.citations),
            answer_sha256=_digest(event.answer),
        )
    elif isinstance(event, AnswerDecided):
        d.update(
            slip=_slip(event.slip),
            mode=event.mode.value,
            votes_for=event.votes_for,
            votes_total=event.votes_total,
            replicas_expected=event.replicas_expected,
            quorum=sorted(s.replica_id for s in event.quorum_certificate),
            dissent=[{"replica": x.replica_id, "reason": _short(x.reason)} for x in event.dissent],
            round=event.revision_round,
            answer_sha256=event.answer_digest,
        )
    elif isinstance(event, AnswerJudged):
        d.update(
            slip=_slip(event.slip),
            scores={
                "faithfulness": round(event.faithfulness, 4),
                "relevance": round(event.relevance, 4),
                "citations": round(event.citation_score, 4),
                **{f"rubric.{k}": round(v, 4) for k, v in event.rubric.items()},
            },
            format_ok=event.format_ok,
            passed=event.passed,
            judge_model=event.judge_model,
            round=event.revision_round,
            critique=event.critique is not None,
            answer_sha256=_digest(event.answer),
        )
    elif isinstance(event, RequestCompleted):
        d.update(
            slip=_slip(event.slip),
            status=event.status.value,
            reason=_short(event.reason),
            scores={k: round(v, 4) for k, v in event.scores.items()},
            findings=_findings(event.findings),
            cached=event.cached,
            degradation=event.degradation,
            review=event.review_event_id,
            citations=len(event.citations),
            answer_sha256=_digest(event.answer),
        )
    elif isinstance(event, HumanReviewRequested):
        d.update(
            reason=_short(event.reason),
            candidates=len(event.candidates),
            findings=_findings(event.findings),
        )
    elif isinstance(event, HumanReviewDecided):
        d.update(
            review=event.review_event_id, decision=event.decision.value, reviewer=event.reviewer
        )
    elif isinstance(event, DocumentSubmitted):
        d.update(
            version=event.doc_version,
            content_type=event.content_type.value,
            content_chars=len(event.content),
            content_sha256=_digest(event.content),
            knowledge_class=event.knowledge_class.value if event.knowledge_class else None,
        )
    elif isinstance(event, DocumentChunked):
        d.update(
            version=event.doc_version,
            content_sha256=event.content_hash,
            chunks=len(event.chunks),
            knowledge_class=event.knowledge_class.value,
            supersedes=event.supersedes_version,
        )
    elif isinstance(event, ChunksEmbedded):
        d.update(version=event.doc_version, dim=event.dim, chunks=len(event.embeddings))
    elif isinstance(event, ChunksIndexed):
        d.update(
            version=event.doc_version,
            collection=event.collection,
            chunks=event.count,
            index_lag_ms=round(event.index_lag_ms, 3),
            superseded=event.superseded_version,
        )
    elif isinstance(event, DocumentRejected):
        d.update(
            version=event.doc_version,
            code=event.code,
            field=event.field,
            reason=_short(event.reason),
            content_sha256=event.content_hash,
        )
    return {k: v for k, v in d.items() if v is not None}


def _versions(event: Event) -> dict[str, str]:
    versions = dict(event.versions)
    if isinstance(event, CandidateAnswer):
        versions.setdefault("template", event.template_version)
    elif isinstance(event, RequestRouted):
        versions.setdefault("template", event.route.template_version)
    elif isinstance(event, AnswerJudged):
        versions.setdefault("judge.model", event.judge_model)
    return versions


def _occurred_ms(event: Event) -> int:
    return int(event.occurred_at.timestamp() * 1000)


def entry_of_event(
    event: Event, envelope: Envelope, record: InRecord, topic: str, recorded_ms: int
) -> Entry:
    """The record of an authenticated, decoded event (``topic`` without namespace prefix is
    the record's own topic name)."""
    replay = (envelope.replay or b"").decode("utf-8", "replace")
    event_id = envelope.event_id or event.event_id
    cost = getattr(event, "cost", None)
    billed = isinstance(event, CandidateAnswer) and not replay
    return Entry(
        topic=topic,
        kafka_partition=record.partition,
        kafka_offset=record.offset,
        # A replayed copy is a record of its own (audited, not billed); a redelivery is not.
        dedupe=f"{event_id}@{replay}" if replay else event_id,
        event_id=event_id,
        event_type=event.EVENT_TYPE,
        request_id=event.request_id if isinstance(event, RequestEvent) else "",
        doc_id=event.doc_id if isinstance(event, KnowledgeEvent) else "",
        tenant=envelope.tenant or event.tenant,
        producer=envelope.producer or event.producer,
        replay=replay,
        status="ok",
        occurred_ms=_occurred_ms(event),
        recorded_ms=recorded_ms,
        model=_model_of(event),
        versions=json_text(_versions(event)),
        detail=json_text(_detail(event)),
        input_tokens=cost.input_tokens if cost is not None else 0,
        output_tokens=cost.output_tokens if cost is not None else 0,
        cost_usd=float(cost.cost_usd) if cost is not None else 0.0,
        billed=1 if billed else 0,
        event_hash=hashlib.sha256(record.value or b"").hexdigest(),
    ).cleaned()


def entry_of_rejected(
    record: InRecord, envelope: Envelope, topic: str, failure: str, reason: str, recorded_ms: int
) -> Entry:
    """The record of a record audit could not authenticate or decode: what its (untrusted)
    headers claim, why it was refused, and the hash of its bytes."""
    value_hash = hashlib.sha256(record.value or b"").hexdigest()
    return Entry(
        topic=topic,
        kafka_partition=record.partition,
        kafka_offset=record.offset,
        # Position + content: its claimed event id may be forged, and may belong to a real
        # event recorded (or yet to be recorded) on its own.
        dedupe=f"{REJECTED}:{record.partition}:{record.offset}:{value_hash[:16]}",
        event_id=envelope.event_id or "",
        event_type=envelope.event_type or "",
        request_id=envelope.request_id or "",
        doc_id=envelope.doc_id or "",
        tenant=envelope.tenant or "",
        producer=envelope.producer or "",
        replay=(envelope.replay or b"").decode("utf-8", "replace"),
        status=f"{REJECTED}:{failure}",
        occurred_ms=record.timestamp,
        recorded_ms=recorded_ms,
        detail=json_text({"reason": reason[:_REASON_CHARS], "claimed": True}),
        event_hash=value_hash,
    ).cleaned()
