"""Builders shared by the consensus tests (unit, Byzantine, integration, chaos): slips,
signed candidates, and an in-memory consensus service.  No tests here."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from stratamesh.bus.publish import event_record, topic_of_event
from stratamesh.bus.testing import MemoryMesh
from stratamesh.bus.topics import Stage
from stratamesh.config import Settings
from stratamesh.events import (
    AnswerDecided,
    CandidateAnswer,
    Event,
    HumanReviewRequested,
    RequestCompleted,
    RoutingSlip,
    SlipStage,
    derived_event_id,
    new_event_id,
)
from stratamesh.events.testing import sample_event
from stratamesh.security.keys import SigningKey
from stratamesh.services.consensus.aggregate import Consensus
from stratamesh.services.consensus.app import build_service
from stratamesh.services.consensus.outcomes import Emission

__all__ = [
    "ListSink",
    "MeshSink",
    "consensus_settings",
    "consensus_slip",
    "make_candidate",
    "memory_consensus",
    "replica_name",
]


def replica_name(k: int) -> str:
    return "infer" if k == 1 else f"infer.r{k}"


def consensus_slip(mode: str, replicas: int, f: int = 0, *, then: str = "guard_out") -> RoutingSlip:
    return RoutingSlip(
        stages=[
            SlipStage(stage=Stage.INFER, params={"replicas": str(replicas)}),
            SlipStage(
                stage=Stage.CONSENSUS,
                params={"mode": mode, "replicas": str(replicas), "f": str(f)},
            ),
            SlipStage(stage=then),
        ],
        current=1,
    )


def make_candidate(
    request_id: str,
    k: int,
    key: SigningKey | None,
    answer: str,
    *,
    tenant: str,
    slip: RoutingSlip,
    source_event_id: str | None = None,
    structured: str | None = None,
    model: str = "smollm2",
    revision_round: int = 0,
    deadline_ms: int | None = None,
    replica_id: str | None = None,
    signature: bytes | None = None,
    **extra: Any,
) -> CandidateAnswer:
    """Replica k's candidate, signed with ``key`` (None: a zero signature)."""
    replica = replica_id or replica_name(k)
    source = source_event_id or new_event_id()
    event = sample_event(
        CandidateAnswer,
        event_id=derived_event_id(source, replica_name(k)),
        request_id=request_id,
        tenant=tenant,
        producer=replica_name(k),
        slip=slip,
        replica_id=replica,
        model=model,
        revision="r1",
        answer=answer,
        structured=structured,
        revision_round=revision_round,
        deadline_ms=deadline_ms,
        signature=b"",
        **extra,
    )
    if signature is None:
        signature = key.sign(event.signing_payload()) if key is not None else bytes(64)
    return event.model_copy(update={"signature": signature})


def consensus_settings(home: Path, scope: str, **consensus: Any) -> Settings:
    return Settings(
        home=home,
        redis_url=os.environ.get("STRATA_REDIS_URL"),
        consensus={"key_scope": f"test-{scope}:", **consensus},  # type: ignore[arg-type]
    )


class ListSink:
    def __init__(self) -> None:
        self.sent: list[Emission] = []

    async def send(self, emissions: Sequence[Emission]) -> None:
        self.sent.extend(emissions)


class MeshSink:
    """The sweeper's outcomes appended to a MemoryMesh as consensus would send them."""

    def __init__(self, mesh: MemoryMesh) -> None:
        self.mesh = mesh

    async def send(self, emissions: Sequence[Emission]) -> None:
        for e in emissions:
            rec = event_record(
                self.mesh.codec,
                "consensus",
                e.event,
                topic_of_event(e.event.EVENT_TYPE),
                next_stage=e.next_stage,
                deadline_ms=e.deadline_ms,
            )
            self.mesh.append(rec)


def memory_consensus(
    settings: Settings, replicas: int = 7, engine: Consensus | None = None
) -> tuple[MemoryMesh, Consensus, dict[int, SigningKey]]:
    """consensus in a MemoryMesh whose keyring holds replicas 1..``replicas``."""
    engine = engine or Consensus()
    svc = build_service(engine)
    mesh = MemoryMesh(svc, settings=settings)
    keys = {k: mesh.identity(replica_name(k)) for k in range(1, replicas + 1)}
    engine.use_keyring(mesh.keyring)
    return mesh, engine, keys


def outcomes_of(mesh: MemoryMesh, tenant: str) -> dict[str, list[Event]]:
    """Per request id of ``tenant``: every decision, review and result consensus wrote."""
    out: dict[str, list[Event]] = {}
    for topic in ("requests.decided", "reviews.pending", "results"):
        for e in mesh.events(topic):
            if isinstance(e, AnswerDecided | HumanReviewRequested | RequestCompleted) and (
                e.tenant == tenant
            ):
                out.setdefault(e.request_id, []).append(e)
    return out
