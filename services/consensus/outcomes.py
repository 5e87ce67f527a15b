"""The events a request's vote ends in: a decision, or an escalation to a human.

Event ids are fixed by the request — ``derived_event_id(anchor, "consensus", i)`` with
``anchor`` a UUIDv5 of (tenant, request id, revision round) — not by the candidate record
that happened to complete the quorum: whichever record (or timer) triggers the outcome,
on whichever instance, before or after a crash, the outcome carries the same ids, so
consumers' idempotency turns any re-send into a no-op.

Every outcome records the model of each vote in ``versions["vote.<replica>"]`` (the
model the candidate reports, and what the replica registry says the replica is).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

from stratamesh.events import (
    EVENT_TYPES,
    AnswerDecided,
    CandidateAnswer,
    CompletionStatus,
    Cost,
    Dissent,
    Event,
    HumanReviewRequested,
    RequestCompleted,
    ReviewCandidate,
    derived_event_id,
    request_anchor_id,
)

from .policy import VotePolicy
from .quorum import Ballot, Reason, Tally, certificate
from .registry import ReplicaRegistry

__all__ = [
    "DECIDE_LATENCY_KEY",
    "STAGE_LATENCY_KEY",
    "Emission",
    "Voted",
    "decision",
    "emissions_of",
    "escalation",
    "outcome_ids",
    "stored_outcome",
]

STAGE_LATENCY_KEY: Final = "consensus"
DECIDE_LATENCY_KEY: Final = "consensus.decide"
DECIDED: Final = "decided"
ESCALATED: Final = "escalated"
FALLBACK: Final = "fallback"


@dataclass(frozen=True, slots=True)
class Emission:
    event: Event
    next_stage: str | None
    deadline_ms: int | None


@dataclass(frozen=True, slots=True)
class Voted:
    """A ballot with its candidate (as stored)."""

    ballot: Ballot
    candidate: CandidateAnswer


def outcome_ids(tenant: str, request_id: str, revision_round: int) -> tuple[str, str, str]:
    """(AnswerDecided, HumanReviewRequested, RequestCompleted) ids of one request round."""
    anchor = request_anchor_id(tenant, request_id, revision_round)
    return (
        derived_event_id(anchor, "consensus", 0),
        derived_event_id(anchor, "consensus", 1),
        derived_event_id(anchor, "consensus", 2),
    )


def _vote_versions(voted: Sequence[Voted], registry: ReplicaRegistry) -> dict[str, str]:
    out: dict[str, str] = {}
    for v in voted:
        c = v.candidate
        text = f"{c.model}@{c.revision}" if c.revision else c.model
        info = registry.get(v.ballot.replica_id)
        if info is not None:
            text += f" key={info.fingerprint}"
            text += "".join(
                f" {k}={val}"
                for k, val in (
                    ("registry_model", info.model),
                    ("backend", info.backend),
                    ("seed", info.seed),
                )
                if val
            )
        if v.ballot.reason is not None:
            text += f" rejected={v.ballot.reason}"
        out[f"vote.{v.ballot.replica_id}"] = text
    return out


def _cost(voted: Sequence[Voted]) -> Cost:
    counted = [v.candidate.cost for v in voted if v.ballot.counted]
    return Cost(
        input_tokens=sum(c.input_tokens for c in counted),
        output_tokens=sum(c.output_tokens for c in counted),
        cost_usd=sum(c.cost_usd for c in counted),
    )


def _slot_identity(service: str, slot: int) -> str:
    return service if slot == 1 else f"{service}.r{slot}"


def _dissent(
    voted: Sequence[Voted], winners: set[int], silent: Sequence[int], service: str, silence: str
) -> list[Dissent]:
    out = []
    for v in sorted(voted, key=lambda v: v.ballot.seq):
        b = v.ballot
        if b.seq in winners:
            continue
        reason = b.reason or Reason.DIFFERENT_ANSWER
        out.append(Dissent(replica_id=b.replica_id, reason=reason, answer_digest=b.digest))
    out += [Dissent(replica_id=_slot_identity(service, s), reason=silence) for s in silent]
    return out


def _representative(members: Sequence[Voted]) -> Voted:
    """The member whose context and citations most members share (earliest on ties): with
    an honest majority in the quorum, never a faulty replica's invented context."""

    def fingerprint(v: Voted) -> str:
        c = v.candidate
        raw = json.dumps(
            [
                [x.model_dump(mode="json") for x in c.context],
                [x.model_dump(mode="json") for x in c.citations],
            ],
            sort_keys=True,
        )
        return hashlib.sha256(raw.encode()).hexdigest()

    prints = [fingerprint(v) for v in members]  # once each: the contexts are the bulk
    counts = Counter(prints)
    best = min(range(len(members)), key=lambda i: (-counts[prints[i]], members[i].ballot.seq))
    return members[best]


def decision(
    *,
    policy: VotePolicy,
    result: Tally,
    klass: int,
    voted: Sequence[Voted],
    registry: ReplicaRegistry,
    producer: str,
    versions: dict[str, str],
    latency_ms: float,
    fallback: bool = False,
    decide_ms: float | None = None,
) -> tuple[AnswerDecided, Emission]:
    by_seq = {v.ballot.seq: v for v in voted}
    members = [by_seq[b.seq] for b in result.classes[klass]]
    rep = _representative(members)
    c = rep.candidate
    slip = c.slip.advanced()
    decided_id, _, _ = outcome_ids(c.tenant, c.request_id, c.revision_round)
    all_versions = {**c.versions, **versions, **_vote_versions(voted, registry)}
    if fallback:
        all_versions["consensus.fallback"] = "plurality"
    latency = dict(c.stage_latency_ms)
    latency[STAGE_LATENCY_KEY] = latency_ms  # first candidate in → decided: the collection
    if decide_ms is not None:
        latency[DECIDE_LATENCY_KEY] = decide_ms
    event = AnswerDecided.derive(
        c,
        stage=producer,
        producer=producer,
        slip=slip,
        answer_digest=c.digest(),
        mode=policy.mode,
        model=f"{c.model}@{c.revision}" if c.revision else c.model,
        votes_for=len(members),
        votes_total=result.votes_total,
        replicas_expected=policy.replicas,
        quorum_certificate=certificate([m.ballot for m in members]),
        dissent=_dissent(
            voted,
            {m.ballot.seq for m in members},
            result.silent,
            registry.service,
            Reason.TIMEOUT if fallback else Reason.NOT_WAITED,
        ),
        candidate_event_ids=[v.ballot.event_id for v in sorted(voted, key=lambda v: v.ballot.seq)],
        cost=_cost(voted),
        versions=all_versions,
        stage_latency_ms=latency,
    ).model_copy(update={"event_id": decided_id})
    return event, Emission(event, slip.next_stage, event.deadline_ms)


def escalation(
    *,
    reason: str,
    result: Tally | None,
    voted: Sequence[Voted],
    registry: ReplicaRegistry,
    producer: str,
    versions: dict[str, str],
    with_result: bool,
) -> list[Emission]:
    """reviews.pending with every candidate (counted or not, so the reviewer sees the
    forgeries too), and the client's ``escalated`` result."""
    ordered = sorted(voted, key=lambda v: v.ballot.seq)
    source = next((v.candidate for v in ordered if v.ballot.counted), ordered[0].candidate)
    _, review_id, result_id = outcome_ids(source.tenant, source.request_id, source.revision_round)
    sizes = {k: len(b) for k, b in result.classes.items()} if result else {}
    candidates = [
        ReviewCandidate(
            answer=v.candidate.answer,
            replica_id=v.ballot.replica_id,
            model=f"{v.candidate.model}@{v.candidate.revision}",
            structured=v.candidate.structured,
            citations=list(v.candidate.citations),
            scores={
                "votes": float(sizes.get(v.ballot.klass, 0) if v.ballot.klass is not None else 0),
                "counted": 1.0 if v.ballot.counted else 0.0,
            },
        )
        for v in ordered
    ]
    all_versions = {**source.versions, **versions, **_vote_versions(ordered, registry)}
    review = HumanReviewRequested.derive(
        source,
        stage=producer,
        producer=producer,
        reason=reason,
        candidates=candidates,
        cost=_cost(ordered),
        versions=all_versions,
    ).model_copy(update={"event_id": review_id})
    out = [Emission(review, None, None)]
    if with_result:
        done = RequestCompleted.derive(
            source,
            stage=producer,
            producer=producer,
            status=CompletionStatus.ESCALATED,
            answer=None,  # withheld: no quorum vouches for any candidate
            structured=None,
            citations=[],
            degradation=None,
            reason=reason[:1024],
            review_event_id=review_id,
            model=None,
            cost=_cost(ordered),
            versions=all_versions,
        ).model_copy(update={"event_id": result_id})
        out.append(Emission(done, None, None))
    return out


def stored_outcome(trigger: str, kind: str, emissions: Sequence[Emission]) -> dict[str, Any]:
    """The JSON form written once to the request's state (and re-sent verbatim)."""
    return {
        "trigger": trigger,
        "kind": kind,
        "events": [
            {
                "type": e.event.EVENT_TYPE,
                "next": e.next_stage,
                "deadline": e.deadline_ms,
                "json": e.event.model_dump_json(),
            }
            for e in emissions
        ],
    }


def emissions_of(outcome: dict[str, Any]) -> list[Emission]:
    return [
        Emission(
            EVENT_TYPES[item["type"]].model_validate_json(item["json"]),
            item["next"],
            item["deadline"],
        )
        for item in outcome["events"]
    ]
