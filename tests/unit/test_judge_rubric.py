"""Judge's pure parts: claim splitting, the JSON-schema check, model families, and the rubric's
rules around its LLM call (a scripted LLM: the only stub in judge's tests)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stratamesh.config import Settings
from stratamesh.events import Citation, Query, RoutingSlip, SlipStage
from stratamesh.models.llm.base import BackendUnavailable
from stratamesh.services.judge.claims import cited_numbers, split_claims
from stratamesh.services.judge.formats import check_format
from stratamesh.services.judge.revision import critique_of, rewound
from stratamesh.services.judge.rubric import Rubric, family_of

from .test_infer_fallback import FakeBackend

CONTEXT = [Citation(doc_id="d", doc_version=1, chunk_id="d#0", text="Paris is in France.")]


def test_claims_keep_their_citations_and_skip_what_asserts_nothing() -> None:
    claims = split_claims(
        "Paris is the capital of France [1, 3]. Is it big? I do not know its size. "
        "It has many museums [2-4]."
    )
    assert [(c.text, c.cited) for c in claims] == [
        ("Paris is the capital of France.", (1, 3)),
        ("It has many museums.", (2, 3, 4)),
    ]
    assert cited_numbers("x [1-2000] y [2]") == [1, 2]


def test_format_is_checked_only_when_json_was_asked_for() -> None:
    plain = Query(prompt="q")
    assert check_format(plain, "free text", None) == (True, [])
    schema = {
        "type": "object",
        "properties": {"tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2}},
        "required": ["tags"],
    }
    asked = Query(prompt="q", response_format=json.dumps(schema))
    assert check_format(asked, "", '{"tags": ["a"]}') == (True, [])
    ok, problems = check_format(asked, "", '{"tags": ["a", "c", "b"]}')
    assert (
        not ok
        and any("$.tags[1]" in p for p in problems)
        and any("more than 2" in p for p in problems)
    )
    assert check_format(asked, "not json", None)[0] is False
    assert check_format(asked, "", "{}") == (False, ["$.tags: missing"])


def test_families_come_from_the_table_and_the_settings() -> None:
    assert family_of("HuggingFaceTB/SmolLM2-135M-Instruct@rev") == "smollm"
    assert family_of("meta-llama/Llama-3.1-8B-Instruct") == "llama"
    assert family_of("TinyLlama/TinyLlama-1.1B") == "llama"
    assert family_of("mistralai/Mixtral-8x7B") == "mistral"
    assert family_of("acme/house-model") is None
    assert family_of("acme/house-model-7b", {"acme/house": "qwen"}) == "qwen"


def rubric_with(backend: FakeBackend, family: str | None = None, **judge: object) -> Rubric:
    r = Rubric()
    r.bind(Settings(home=Path("/nonexistent"), judge=judge))  # type: ignore[arg-type]
    r.use_backend(backend, family)
    return r


async def test_the_rubric_runs_with_a_judge_of_another_family_and_records_it() -> None:
    lm = FakeBackend("judge", '{"faithfulness": 5, "relevance": 4, "completeness": 1}')
    lm._model = "meta-llama/Llama-3.1-8B-Instruct"
    r = rubric_with(lm)
    out = await r.grade(
        question="Where is Paris?",
        answer="In France [1].",
        context=CONTEXT,
        answer_model="HuggingFaceTB/SmolLM2-135M-Instruct@x",
        criteria=[],
    )
    assert out.note == "ran"
    assert out.scores == {"faithfulness": 1.0, "relevance": 0.75, "completeness": 0.0}
    assert out.judge_model == "meta-llama/Llama-3.1-8B-Instruct@rev1"
    [call] = lm.calls
    assert call.json_schema is not None and set(call.json_schema["required"]) == set(out.scores)
    assert "[1] Paris is in France." in call.messages[-1].content


async def test_the_rubric_is_skipped_for_the_same_family_or_an_unknown_one() -> None:
    lm = FakeBackend("judge", '{"relevance": 5}')
    lm._model = "HuggingFaceTB/SmolLM2-360M-Instruct"
    r = rubric_with(lm)
    out = await r.grade(
        question="q",
        answer="a",
        context=[],
        answer_model="HuggingFaceTB/SmolLM2-135M-Instruct",
        criteria=["relevance"],
    )
    assert out.scores == {} and out.judge_model == "none" and lm.calls == []
    assert out.note == (
        "skipped: judge model HuggingFaceTB/SmolLM2-360M-Instruct is of the answering "
        "model's family (smollm)"
    )
    out = await r.grade(
        question="q", answer="a", context=[], answer_model="acme/house", criteria=["relevance"]
    )
    assert out.note.startswith("skipped: family of answering model acme/house unknown")


async def test_without_a_judge_model_or_endpoint_the_rubric_says_so() -> None:
    r = Rubric()
    r.bind(Settings(home=Path("/nonexistent")))
    out = await r.grade(question="q", answer="a", context=[], answer_model="x", criteria=[])
    assert out.note == "skipped: no judge model configured (STRATA_JUDGE__RUBRIC_MODEL)"
    r.bind(Settings(home=Path("/nonexistent"), judge={"rubric_model": "qwen2"}))  # type: ignore[arg-type]
    out = await r.grade(question="q", answer="a", context=[], answer_model="x", criteria=[])
    assert "has no endpoint" in out.note


@pytest.mark.parametrize(
    ("reply", "why"),
    [
        (BackendUnavailable("down"), "judge model call failed"),
        ('{"relevance": 4}', "gave no score for ['faithfulness']"),
    ],
)
async def test_a_failed_or_partial_rubric_is_skipped_not_invented(reply: object, why: str) -> None:
    lm = FakeBackend("judge", reply)  # type: ignore[arg-type]
    lm._model = "Qwen/Qwen2.5-7B-Instruct"
    r = rubric_with(lm)
    out = await r.grade(
        question="q",
        answer="a",
        context=[],
        answer_model="HuggingFaceTB/SmolLM2-135M-Instruct",
        criteria=["relevance", "faithfulness"],
    )
    assert out.scores == {} and why in out.note


def test_the_slip_rewinds_to_the_infer_stage_before_judge() -> None:
    slip = RoutingSlip(
        stages=[SlipStage(stage=s) for s in ("retrieve", "infer", "judge", "guard_out")],
        current=2,
    )
    back = rewound(slip)
    assert back is not None and back.current == 1 and back.next_stage == "infer"
    assert rewound(slip.model_copy(update={"current": 1})) is None  # nothing before infer
    lines = [f"problem {i}" for i in range(9)]
    text = critique_of([*lines, "problem 0"])
    assert text.count("\n- ") == 6 and text.endswith("... and 3 more.")
