"""The judge service on the real broker with the real MiniLM and grounding artifact; the
revision round through the real infer service and the real local SmolLM2 (24 tokens)."""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from stratamesh.bus import headers as H
from stratamesh.bus import topics as T
from stratamesh.bus.codec import Codec
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
from stratamesh.models.llm.local import SMOLLM2_MODEL_ID
from stratamesh.services.infer.app import InferEngine
from stratamesh.services.infer.app import build_service as build_infer
from stratamesh.services.judge.app import JudgeEngine, build_service
from tests.integration.conftest import Env
from tests.integration.test_bus import read_all

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
        doc_id="louvre",
        doc_version=1,
        chunk_id="louvre#0",
        text="The Louvre is the world's most-visited art museum, in Paris.",
        rank=1,
    ),
]


@pytest.fixture(scope="module")
def models_dir() -> Path:
    """The converted SmolLM2 shared with tests/integration/test_infer.py."""
    path = os.environ.get("STRATA_TEST_MODELS_DIR")
    return Path(path) if path else Path.home() / ".cache" / "stratamesh" / "models"


def slip(*stages: str, at: str) -> RoutingSlip:
    return RoutingSlip(
        stages=[
            SlipStage(stage=s, params={"threshold": "0.7"} if s == "judge" else {}) for s in stages
        ],
        current=stages.index(at),
    )


def answer_event(
    cls: type[AnswerDecided] | type[CandidateAnswer],
    request_id: str,
    answer: str,
    stages: tuple[str, ...],
) -> Any:
    base = sample_event(cls, tenant="acme", request_id=request_id)
    route = base.route.model_copy(
        update={
            "model": SMOLLM2_MODEL_ID,
            "template_version": "qa@1",
            "adapter": None,
            "judge": JudgePolicy(enabled=True, threshold=0.7, max_revisions=1),
        }
    )
    query = base.query.model_copy(
        update={
            "prompt": "When was the Eiffel Tower completed?",
            "response_format": None,
            "canary": None,
            "max_tokens": 24,
        }
    )
    fields: dict[str, Any] = {
        "event_id": str(uuid.uuid4()),  # CI's Redis keeps idempotency keys across runs
        "slip": slip(*stages, at="judge"),
        "route": route,
        "query": query,
        "context": CONTEXT,
        "answer": answer,
        "structured": None,
        "citations": [],
        "revision_round": 0,
        "versions": {},
    }
    if cls is CandidateAnswer:
        fields.update(model=SMOLLM2_MODEL_ID, revision="test", degradation="full")
    else:
        fields["model"] = f"{SMOLLM2_MODEL_ID}@test"
    return base.model_copy(update=fields)


def judged(settings: Settings, records: list[Any], request_id: str) -> list[tuple[bytes, Any]]:
    codec = Codec.from_settings(settings)
    out = []
    for r in records:
        event = codec.decode(r.value)
        if isinstance(event, AnswerJudged) and event.request_id == request_id:
            out.append((H.header_dict(r.headers)[H.NEXT], event))
    return out


async def test_a_decided_answer_is_judged_and_addressed_to_guard_out(env: Env, unique: str) -> None:
    consensus = await env.publisher("consensus")  # before the service loads the keyring
    await env.start(build_service(JudgeEngine()))
    request_id = f"judge-ok-{unique}"
    decided = answer_event(
        AnswerDecided,
        request_id,
        "The Eiffel Tower was completed in 1889 [1].",
        ("retrieve", "infer", "consensus", "judge", "guard_out"),
    )
    deadline = int(time.time() * 1000) + 60_000
    await consensus.publish(
        decided, topic_name=T.REQUESTS_DECIDED, next_stage="judge", deadline_ms=deadline
    )
    records = await read_all(env.settings, T.REQUESTS_JUDGED, 1, timeout=60)
    [(next_stage, out)] = judged(env.settings, records, request_id)
    assert next_stage == b"guard_out" and out.slip.next_stage == "guard_out"
    assert out.producer == "judge" and out.passed and out.critique is None
    assert out.faithfulness == 1.0 and out.citation_score == 1.0 and out.relevance > 0.5
    assert out.judge_model == "none" and out.versions["judge.rubric"].startswith("skipped:")
    assert out.versions["judge.grounding"] == "grounding-v1"
    assert out.versions["judge.revisions"] == "0/1"
    assert out.context == CONTEXT and out.model == f"{SMOLLM2_MODEL_ID}@test"


async def test_a_failing_answer_goes_back_to_infer_once(
    env: Env, unique: str, models_dir: Path
) -> None:
    settings = env.settings.model_copy(
        update={
            "infer": env.settings.infer.model_copy(
                update={"models_dir": models_dir, "max_tokens": 24, "local_runtime": "transformers"}
            )
        }
    )
    infer = await env.publisher("infer")  # before the services load the keyring
    await env.start(build_service(JudgeEngine()), settings)
    await env.start(build_infer(InferEngine()), settings)
    request_id = f"judge-revise-{unique}"
    first = answer_event(
        CandidateAnswer,
        request_id,
        "The Eiffel Tower was completed in 1889 [4].",  # there are two passages
        ("retrieve", "infer", "judge", "guard_out"),
    )
    deadline = int(time.time() * 1000) + 180_000
    await infer.publish(
        first, topic_name=T.INFERENCE_COMPLETED, next_stage="judge", deadline_ms=deadline
    )
    records = await read_all(settings, T.REQUESTS_JUDGED, 2, timeout=180)
    # nothing more comes: the cap (1 round) is reached after the revised answer
    records += [
        r
        for r in await read_all(settings, T.REQUESTS_JUDGED, len(records) + 1, timeout=3)
        if (r.partition, r.offset) not in {(x.partition, x.offset) for x in records}
    ]
    rounds = judged(settings, records, request_id)
    assert [n for n, _ in rounds] == [b"infer", b"guard_out"]
    back, final = rounds[0][1], rounds[1][1]
    assert not back.passed and back.citation_score < 1.0 and back.revision_round == 0
    assert back.critique is not None and "[4] cites a passage that was not retrieved" in (
        back.critique
    )
    assert back.slip.next_stage == "infer"
    assert final.revision_round == 1 and final.versions["judge.revisions"] == "1/1"
    assert final.slip.next_stage == "guard_out"
    # the revision was a real generation by infer's local model, with the revise template
    codec = Codec.from_settings(settings)
    revised = [
        e
        for r in await read_all(settings, T.INFERENCE_COMPLETED, 2, timeout=10)
        if isinstance(e := codec.decode(r.value), CandidateAnswer)
        and e.request_id == request_id
        and e.producer == "infer"
        and e.revision_round == 1
    ]
    [candidate] = revised
    assert candidate.template_version == "revise@1" and candidate.degradation == "full"
    assert candidate.model == SMOLLM2_MODEL_ID and 0 < candidate.cost.output_tokens <= 24
    assert final.answer == candidate.answer and candidate.slip.next_stage == "judge"
