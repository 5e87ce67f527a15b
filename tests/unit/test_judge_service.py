"""The judge service in memory, with the real MiniLM and the shipped grounding artifact:
grounded answers pass, invented citations and contradictions fail, the revision round goes
back to infer along the slip and stops at its cap (infer in the loop with a scripted LM)."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest

from stratamesh.bus import headers as H
from stratamesh.bus import topics as T
from stratamesh.bus.testing import MemoryMesh
from stratamesh.config import Settings
from stratamesh.events import (
    AnswerDecided,
    AnswerJudged,
    CandidateAnswer,
    Citation,
    JudgePolicy,
    RoutingSlip,
    SlipStage,
)
from stratamesh.events.testing import sample_event
from stratamesh.models.embedders import LocalEmbedder
from stratamesh.models.llm.base import CompletionRequest
from stratamesh.services.infer.app import InferEngine
from stratamesh.services.infer.app import build_service as build_infer
from stratamesh.services.judge.app import JudgeEngine, build_service

from .test_infer_fallback import FakeBackend

CONTEXT = [
    Citation(
        doc_id="eiffel",
        doc_version=1,
        chunk_id="eiffel#0",
        text="The Eiffel Tower is a wrought-iron lattice tower in Paris. "
        "It was completed in 1889 for the World's Fair.",
        rank=0,
    ),
    Citation(
        doc_id="exercise",
        doc_version=1,
        chunk_id="exercise#0",
        text="Regular aerobic exercise reduces the risk of heart disease in adults. "
        "It also lowers blood pressure.",
        rank=1,
    ),
]
QUESTION = "When was the Eiffel Tower completed?"
STAGES = ("retrieve", "infer", "consensus", "judge", "guard_out")


@pytest.fixture(scope="module")
def embedder() -> LocalEmbedder:
    return LocalEmbedder()  # loaded once for the module


def make_mesh(embedder: LocalEmbedder, tmp_path: Path, *extra: Any, **judge: Any) -> MemoryMesh:
    engine = JudgeEngine()
    engine.use_embedder(embedder)
    settings = Settings(home=tmp_path, redis_url=None, judge=judge)  # type: ignore[arg-type]
    return MemoryMesh(build_service(engine), *extra, settings=settings)


def decided(
    answer: str,
    *,
    request_id: str = "r1",
    citations: list[Citation] | None = None,
    question: str = QUESTION,
    revision_round: int = 0,
    policy: JudgePolicy | None = None,
    **fields: Any,
) -> AnswerDecided:
    event = sample_event(AnswerDecided, tenant="acme", request_id=request_id)
    slip = RoutingSlip(
        stages=[
            SlipStage(stage=s, params={"threshold": "0.7"} if s == "judge" else {}) for s in STAGES
        ],
        current=STAGES.index("judge"),
    )
    route = event.route.model_copy(
        update={
            "model": "HuggingFaceTB/SmolLM2-135M-Instruct",
            "template_version": "qa@1",
            "judge": policy or JudgePolicy(enabled=True, threshold=0.7, max_revisions=1),
        }
    )
    query = event.query.model_copy(
        update={"prompt": question, "response_format": None, "canary": None}
    )
    return event.model_copy(
        update={
            "slip": slip,
            "route": route,
            "query": query,
            "context": CONTEXT,
            "answer": answer,
            "structured": None,
            "citations": citations if citations is not None else [],
            "model": "HuggingFaceTB/SmolLM2-135M-Instruct@test",
            "revision_round": revision_round,
            "versions": {},
            "event_id": str(uuid.uuid4()),
            **fields,
        }
    )


async def judge_one(mesh: MemoryMesh, event: AnswerDecided) -> tuple[AnswerJudged, bytes]:
    before = len(mesh.topics[T.REQUESTS_JUDGED])
    await mesh.publish(event, as_="consensus", next_stage="judge")
    await mesh.run_until_idle()
    records = mesh.topics[T.REQUESTS_JUDGED][before:]
    assert len(records) == 1, [o for o in mesh.outcomes if o[0] == "judge"]
    out = mesh.codec.decode(records[0].value or b"")
    assert isinstance(out, AnswerJudged)
    return out, H.header_dict(records[0].headers)[H.NEXT]


async def test_a_grounded_cited_answer_passes_to_guard_out(
    embedder: LocalEmbedder, tmp_path: Path
) -> None:
    mesh = make_mesh(embedder, tmp_path)
    out, next_stage = await judge_one(
        mesh,
        decided(
            "The Eiffel Tower was completed in 1889 [1]. It is a wrought-iron tower in Paris [1].",
            citations=[CONTEXT[0]],
        ),
    )
    assert next_stage == b"guard_out" and out.slip.current == STAGES.index("guard_out")
    assert out.passed and out.critique is None
    assert out.faithfulness == 1.0 and out.citation_score == 1.0
    assert out.relevance > 0.5 and out.format_ok
    # no judge model of another family here: rubric skipped, and the event says why
    assert out.rubric == {} and out.judge_model == "none"
    assert out.versions["judge.rubric"].startswith("skipped: no judge model configured")
    assert out.versions["judge.grounding"] == "grounding-v1"
    assert out.versions["judge.revisions"] == "0/1"
    assert out.stage_latency_ms["judge"] > 0 and out.producer == "judge"


async def test_citing_a_passage_that_was_never_retrieved_fails(
    embedder: LocalEmbedder, tmp_path: Path
) -> None:
    mesh = make_mesh(embedder, tmp_path)
    ghost = Citation(doc_id="ghost", doc_version=1, chunk_id="ghost#0", text="Made up.")
    out, next_stage = await judge_one(
        mesh,
        decided(
            "The Eiffel Tower was completed in 1889 [3].",
            citations=[ghost],
            revision_round=1,  # at the cap: scored and sent on, not back
        ),
    )
    assert not out.passed and next_stage == b"guard_out"
    assert out.citation_score == 0.0
    assert out.faithfulness == 1.0  # the claim itself is grounded; its citation is not
    assert out.critique is not None
    assert "[3] cites a passage that was not retrieved" in out.critique
    assert "ghost#0" in out.critique
    assert out.versions["judge.revisions"] == "1/1"


async def test_a_citation_of_a_passage_that_does_not_support_the_sentence_fails(
    embedder: LocalEmbedder, tmp_path: Path
) -> None:
    mesh = make_mesh(embedder, tmp_path)
    out, _ = await judge_one(
        mesh, decided("The Eiffel Tower was completed in 1889 [2].", revision_round=1)
    )
    assert out.faithfulness == 1.0 and out.citation_score == 0.0 and not out.passed
    assert out.critique is not None and "passage [2] does not support" in out.critique


async def test_an_answer_contradicting_its_context_is_flagged(
    embedder: LocalEmbedder, tmp_path: Path
) -> None:
    mesh = make_mesh(embedder, tmp_path)
    out, _ = await judge_one(
        mesh,
        decided(
            "Regular aerobic exercise increases the risk of heart disease in adults [2].",
            question="Does exercise affect heart disease risk?",
            revision_round=1,
        ),
    )
    assert out.faithfulness == 0.0 and not out.passed
    assert out.critique is not None and "contradicts the passages" in out.critique


async def test_an_unsupported_claim_lowers_faithfulness(
    embedder: LocalEmbedder, tmp_path: Path
) -> None:
    mesh = make_mesh(embedder, tmp_path)
    out, _ = await judge_one(
        mesh,
        decided(
            "The Eiffel Tower was completed in 1889 [1]. "
            "Its architect later designed the Sydney Opera House in 1973 [1].",
            revision_round=1,
        ),
    )
    assert out.faithfulness == 0.5 and not out.passed
    assert out.critique is not None and "Sydney Opera House" in out.critique


async def test_a_structured_answer_breaking_its_schema_is_not_format_compliant(
    embedder: LocalEmbedder, tmp_path: Path
) -> None:
    mesh = make_mesh(embedder, tmp_path)
    schema = {
        "type": "object",
        "properties": {"year": {"type": "integer"}},
        "required": ["year"],
        "additionalProperties": False,
    }
    base = decided('{"year": "1889"}', revision_round=1)
    event = base.model_copy(
        update={
            "structured": '{"year": "1889"}',
            "query": base.query.model_copy(update={"response_format": json.dumps(schema)}),
        }
    )
    out, _ = await judge_one(mesh, event)
    assert not out.format_ok and not out.passed
    assert out.critique is not None and "$.year: expected integer" in out.critique
    good = event.model_copy(
        update={"structured": '{"year": 1889}', "request_id": "r2", "event_id": str(uuid.uuid4())}
    )
    out2, _ = await judge_one(mesh, good)
    assert out2.format_ok


async def test_below_threshold_goes_back_to_infer_with_the_critique(
    embedder: LocalEmbedder, tmp_path: Path
) -> None:
    mesh = make_mesh(embedder, tmp_path)
    out, next_stage = await judge_one(mesh, decided("The Eiffel Tower was completed in 1889 [7]."))
    # rewound to the infer stage of the same slip, round 0 of 1
    assert next_stage == b"infer" and out.slip.current == STAGES.index("infer")
    assert [s.stage for s in out.slip.stages] == list(STAGES)
    assert not out.passed and out.revision_round == 0 and out.critique
    assert "[7]" in out.critique and out.versions["judge.revisions"] == "0/1"


async def test_the_policy_cannot_raise_the_revision_cap_above_the_setting(
    embedder: LocalEmbedder, tmp_path: Path
) -> None:
    mesh = make_mesh(embedder, tmp_path, max_revisions=1)
    policy = JudgePolicy(enabled=True, threshold=0.7, max_revisions=5)
    out, next_stage = await judge_one(
        mesh, decided("Completed in 1889 [9].", revision_round=1, policy=policy)
    )
    assert next_stage == b"guard_out" and out.versions["judge.revisions"] == "1/1"
    # and a policy of 0 revisions never sends back
    none = JudgePolicy(enabled=True, threshold=0.7, max_revisions=0)
    out, next_stage = await judge_one(
        mesh, decided("Completed in 1889 [9].", request_id="r2", policy=none)
    )
    assert next_stage == b"guard_out" and out.versions["judge.revisions"] == "0/0"


async def test_the_revision_loop_through_infer_stops_at_its_cap(
    embedder: LocalEmbedder, tmp_path: Path
) -> None:
    """judge → infer (critique) → judge → guard_out: a stubborn model gets one round only."""
    lm = FakeBackend("local", "The Eiffel Tower was completed in 1889 [5].", model="fake")
    infer = InferEngine()
    infer.use_backends({"local": lm})
    infer_svc = build_infer(infer)
    mesh = make_mesh(embedder, tmp_path, infer_svc)
    infer.use_signing_key(mesh.identity("infer"))
    slip = RoutingSlip(
        stages=[SlipStage(stage=s) for s in ("retrieve", "infer", "judge", "guard_out")],
        current=2,
    )
    first = sample_event(CandidateAnswer, tenant="acme", request_id="loop")
    first = first.model_copy(
        update={
            "slip": slip,
            "route": decided("x").route,
            "query": decided("x").query,
            "context": CONTEXT,
            "answer": "The Eiffel Tower was completed in 1889 [4].",
            "citations": [],
            "degradation": "full",
            "revision_round": 0,
            "versions": {},
        }
    )
    await mesh.publish(first, as_="infer", next_stage="judge")
    await mesh.run_until_idle()

    judged = [e for e in mesh.events(T.REQUESTS_JUDGED) if isinstance(e, AnswerJudged)]
    nexts = [H.header_dict(r.headers)[H.NEXT] for r in mesh.topics[T.REQUESTS_JUDGED]]
    assert nexts == [b"infer", b"guard_out"]
    assert [j.revision_round for j in judged] == [0, 1]
    assert [j.versions["judge.revisions"] for j in judged] == ["0/1", "1/1"]
    assert not judged[1].passed and "[5]" in (judged[1].critique or "")
    # infer answered the revision once, with the critique after its previous answer
    [call] = lm.calls
    assert isinstance(call, CompletionRequest)
    assert call.messages[-2].role == "assistant" and "[4]" in call.messages[-2].content
    assert "[4] cites a passage that was not retrieved" in call.messages[-1].content
    revised = [e for e in mesh.events(T.INFERENCE_COMPLETED) if e.producer == "infer"]
    assert [c.revision_round for c in revised if isinstance(c, CandidateAnswer)][-1] == 1
    assert revised[-1].versions["template"] == "revise@1"


async def test_an_expired_candidate_is_passed_on_unscored(
    embedder: LocalEmbedder, tmp_path: Path
) -> None:
    mesh = make_mesh(embedder, tmp_path)
    slip = RoutingSlip(
        stages=[SlipStage(stage=s) for s in ("infer", "judge", "guard_out")], current=1
    )
    cand = sample_event(CandidateAnswer, tenant="acme", request_id="late").model_copy(
        update={"slip": slip, "answer": "", "degradation": "expired", "versions": {}}
    )
    await mesh.publish(cand, as_="infer", next_stage="judge")
    await mesh.run_until_idle()
    [out] = mesh.events(T.REQUESTS_JUDGED)
    assert isinstance(out, AnswerJudged)
    assert out.versions["degradation"] == "expired" and not out.passed
    assert out.slip.next_stage == "guard_out" and out.critique is None


async def test_infer_refuses_a_judged_answer_that_asks_for_no_revision(tmp_path: Path) -> None:
    infer = InferEngine()
    lm = FakeBackend("local", "unused")
    infer.use_backends({"local": lm})
    mesh = MemoryMesh(build_infer(infer), settings=Settings(home=tmp_path, redis_url=None))
    infer.use_signing_key(mesh.identity("infer"))
    slip = RoutingSlip(
        stages=[SlipStage(stage=s) for s in ("infer", "judge", "guard_out")], current=0
    )
    passed = sample_event(AnswerJudged, tenant="acme", request_id="odd").model_copy(
        update={"slip": slip, "passed": True, "critique": None}
    )
    await mesh.publish(passed, as_="judge", next_stage="infer")
    await mesh.run_until_idle()
    assert lm.calls == [] and mesh.topics[T.INFERENCE_COMPLETED] == []
    assert len(mesh.topics[T.REQUESTS_JUDGED + ".dlq"]) == 1
