"""The event models: generated from the schemas, ids, keys, helpers."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from pydantic import ValidationError

import stratamesh.events as events
from stratamesh.bus.topics import TOPICS
from stratamesh.events import (
    EVENT_TYPES,
    SOURCE_DIGEST,
    AnswerDecided,
    CandidateAnswer,
    ContextRetrieved,
    DocumentChunked,
    DocumentSubmitted,
    Event,
    InferenceRequested,
    KnowledgeEvent,
    Priority,
    RequestEvent,
    RoutingSlip,
    SlipStage,
    answer_digest,
    candidate_signing_payload,
    codegen,
    derived_event_id,
    load_schema,
    new_event_id,
)
from stratamesh.events.schemas import current_schemas, schema_files, source_digest
from stratamesh.events.testing import any_event, sample_event

NOW = datetime(2025, 6, 1, 12, 0, 0, 123000, tzinfo=UTC)


# --------------------------------------------------------------------------- one source of truth


def test_generated_models_are_up_to_date() -> None:
    """Fails when schemas/*.avsc changed without `python -m stratamesh.events.codegen`."""
    expected = codegen.generate()
    actual = codegen.target_path().read_text(encoding="utf-8")
    assert actual == expected, "run: python -m stratamesh.events.codegen"
    assert source_digest() == SOURCE_DIGEST
    assert codegen.main(["--check"], out=lambda _: None) == 0


def test_codegen_check_detects_a_stale_file(tmp_path: Path) -> None:
    stale = tmp_path / "_generated.py"
    stale.write_text(codegen.target_path().read_text() + "# edited\n")
    lines: list[str] = []
    assert codegen.main(["--check", "--output", str(stale)], out=lines.append) == 1
    assert "out of date" in lines[0]
    assert codegen.main(["--output", str(stale)], out=lines.append) == 0
    assert stale.read_text() == codegen.generate()


def test_codegen_follows_schema_changes() -> None:
    schemas = current_schemas()
    schemas["DocumentRejected"]["fields"].append(
        {"name": "severity", "type": ["null", "int"], "default": None, "doc": "How bad."}
    )
    source = codegen.generate(schemas)
    assert 'severity: Int32 | None = Field(None, description="How bad.")' in source
    assert source != codegen.generate()


def test_codegen_refuses_inconsistent_schemas() -> None:
    schemas = current_schemas()
    for f in schemas["RequestCompleted"]["fields"]:
        if f["name"] == "tenant":
            f["doc"] = "something else"
    with pytest.raises(codegen.CodegenError, match=r"RequestCompleted\.tenant differs"):
        codegen.generate(schemas)

    schemas = current_schemas()
    # Priority is defined inline in every request event: redefine it in one of them.
    for f in schemas["RequestAdmitted"]["fields"]:
        if f["name"] == "priority":
            f["type"]["symbols"] = ["enterprise", "free"]
    with pytest.raises(codegen.CodegenError, match="Priority is defined differently"):
        codegen.generate(schemas)

    schemas = current_schemas()
    schemas["ChunksIndexed"]["fields"].append(
        {"name": "either", "type": ["string", "int"], "doc": "x"}
    )
    with pytest.raises(codegen.CodegenError, match="only"):
        codegen.generate(schemas)

    schemas = current_schemas()
    schemas["ChunksIndexed"]["fields"].append(
        {"name": "bad", "type": ["null", "int"], "default": 3, "doc": "x"}
    )
    with pytest.raises(codegen.CodegenError, match="bad default"):
        codegen.generate(schemas)


def test_every_topic_has_its_event_schema_and_model() -> None:
    assert {t.event_type for t in TOPICS} == set(EVENT_TYPES)
    current = {f.event_type for f in schema_files() if f.is_current}
    assert current == set(EVENT_TYPES)
    for spec in TOPICS:
        cls = EVENT_TYPES[spec.event_type]
        assert spec.event_type == cls.EVENT_TYPE
        assert f"stratamesh.events.{spec.event_type}" == cls.AVRO_NAME
        assert spec.plane == cls.PLANE
        assert spec.key == cls.KEY_FIELD
        assert issubclass(cls, KnowledgeEvent if spec.plane == "knowledge" else RequestEvent)
        assert cls.default_topic() == spec.name
        schema = load_schema(spec.event_type)
        assert {f["name"] for f in schema["fields"]} == set(cls.model_fields)


def test_envelope_fields() -> None:
    for cls in EVENT_TYPES.values():
        fields = cls.model_fields
        for name in (
            "event_id",
            "tenant",
            "occurred_at",
            "producer",
            "unsigned_ingress",
            "versions",
        ):
            assert name in fields
        if issubclass(cls, RequestEvent):
            for name in ("request_id", "priority", "deadline_ms", "stage_latency_ms"):
                assert name in fields
        else:
            assert {"doc_id", "doc_version"} <= set(fields)


def test_public_names_are_exported() -> None:
    assert set(events._generated.__all__) <= set(events.__all__)
    for name in events.__all__:
        assert hasattr(events, name), name
    for name in ("Event", "EVENT_TYPES", "new_event_id", "derived_event_id", "Priority"):
        assert name in events.__all__


# --------------------------------------------------------------------------- ids


def test_new_event_id_is_a_monotonic_uuid7() -> None:
    before = int(datetime.now(UTC).timestamp() * 1000)
    ids = [new_event_id() for _ in range(5000)]
    after = int(datetime.now(UTC).timestamp() * 1000)
    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids)  # canonical strings sort like the 128-bit values
    for text in (ids[0], ids[-1]):
        u = uuid.UUID(text)
        assert str(u) == text
        assert u.version == 7
        assert u.variant == uuid.RFC_4122
        assert before - 1 <= u.int >> 80 <= after + 1


def test_derived_event_id_is_deterministic_and_distinct() -> None:
    source = new_event_id()
    a = derived_event_id(source, "infer.replica-1")
    assert a == derived_event_id(source, "infer.replica-1", 0)
    assert a == derived_event_id(source.upper(), "infer.replica-1")  # any UUID spelling
    others = {
        derived_event_id(source, "infer.replica-2"),
        derived_event_id(source, "infer.replica-1", 1),
        derived_event_id(new_event_id(), "infer.replica-1"),
        derived_event_id(source, "infer.replica-"),
    }
    assert a not in others and len(others) == 4
    u = uuid.UUID(a)
    assert u.version == 8
    assert u.variant == uuid.RFC_4122
    assert u.int >> 80 == uuid.UUID(source).int >> 80  # sorts with its origin
    with pytest.raises(ValueError, match="not a UUID"):
        derived_event_id("request-1", "route")
    with pytest.raises(ValueError, match="index"):
        derived_event_id(source, "route", -1)


# --------------------------------------------------------------------------- field types


def _request(**overrides: Any) -> InferenceRequested:
    return sample_event(InferenceRequested, prompt="p", **overrides)


def test_timestamps_are_aware_utc_milliseconds() -> None:
    paris = timezone(timedelta(hours=2))
    event = _request(occurred_at=datetime(2025, 6, 1, 14, 0, 0, 123456, tzinfo=paris))
    assert event.occurred_at == NOW
    assert event.occurred_at.tzinfo is UTC
    assert event.occurred_at.microsecond == 123000
    with pytest.raises(ValidationError, match="timezone"):
        _request(occurred_at=datetime(2025, 6, 1, 12, 0))  # naive: refused


def test_uuid_fields_are_canonical() -> None:
    raw = uuid.uuid4()
    assert _request(event_id=raw).event_id == str(raw)
    assert _request(event_id=str(raw).upper()).event_id == str(raw)
    assert _request(event_id=raw.hex).event_id == str(raw)
    with pytest.raises(ValidationError, match="not a UUID"):
        _request(event_id="request-1")


def test_avro_int_and_long_ranges_are_enforced() -> None:
    assert _request(max_tokens=2**31 - 1).max_tokens == 2**31 - 1
    with pytest.raises(ValidationError, match="max_tokens"):
        _request(max_tokens=2**31)
    with pytest.raises(ValidationError, match="deadline_ms"):
        _request(deadline_ms=2**63)


def test_models_are_frozen_and_strict_about_names() -> None:
    event = _request()
    with pytest.raises(ValidationError, match="frozen"):
        event.prompt = "other"  # type: ignore[misc]
    with pytest.raises(ValidationError, match="extra"):
        _request(promtp="typo")
    assert _request(priority="enterprise").priority is Priority.ENTERPRISE


def test_defaults_follow_the_schema() -> None:
    event = _request()
    assert event.task == "qa"
    assert event.messages == [] and event.client_metadata == {}
    assert event.deadline_ms is None and event.unsigned_ingress is False
    completed = sample_event(events.RequestCompleted, status="ok")
    assert completed.cost == events.Cost(input_tokens=0, output_tokens=0, cost_usd=0.0)
    assert completed.cost is not sample_event(events.RequestCompleted, status="ok").cost


# --------------------------------------------------------------------------- behaviour


def test_keys() -> None:
    doc = sample_event(DocumentSubmitted, doc_id="handbook", content="x")
    assert doc.key == "handbook" and doc.key_bytes == b"handbook"
    req = _request(request_id="r-1")
    assert req.key == "r-1" and req.key_bytes == b"r-1"
    assert isinstance(req, Event) and isinstance(doc, Event)


def test_derive_carries_shared_fields() -> None:
    submitted = sample_event(
        DocumentSubmitted,
        doc_id="d",
        tenant="acme",
        content="x",
        versions={"a": "1"},
        unsigned_ingress=True,
    )
    chunked = DocumentChunked.derive(
        submitted,
        stage="ingest",
        producer="ingest",
        doc_version=3,
        content_hash="h",
        knowledge_class="anchored",
        chunks=[],
    )
    assert chunked.event_id == derived_event_id(submitted.event_id, "ingest")
    assert (chunked.tenant, chunked.doc_id, chunked.title) == ("acme", "d", submitted.title)
    assert chunked.versions == {"a": "1"} and chunked.unsigned_ingress is True
    assert chunked.producer == "ingest"
    assert chunked.occurred_at > submitted.occurred_at
    again = DocumentChunked.derive(
        submitted,
        stage="ingest",
        producer="ingest",
        doc_version=3,
        content_hash="h",
        knowledge_class="anchored",
        chunks=[],
    )
    assert again.event_id == chunked.event_id  # reprocessing yields the same id
    with pytest.raises(ValidationError, match="doc_version"):
        # DocumentSubmitted.doc_version is optional; DocumentChunked requires one.
        DocumentChunked.derive(
            submitted,
            stage="ingest",
            producer="ingest",
            content_hash="h",
            knowledge_class="fluid",
            chunks=[],
        )


def test_derive_through_the_request_plane() -> None:
    retrieved = sample_event(
        ContextRetrieved,
        request_id="r",
        priority="pro",
        deadline_ms=5,
        stage_latency_ms={"route": 1.5},
        collection="c",
    )
    candidate = CandidateAnswer.derive(
        retrieved,
        stage="infer.replica-2",
        producer="infer.replica-2",
        replica_id="r2",
        model="m",
        revision="1",
        template_version="t@1",
        sampling={"temperature": 0.0},
        answer="42",
        signature=b"sig",
    )
    assert candidate.context == retrieved.context
    assert (candidate.request_id, candidate.priority, candidate.deadline_ms) == ("r", "pro", 5)
    assert candidate.slip == retrieved.slip and candidate.route == retrieved.route
    assert candidate.stage_latency_ms == {"route": 1.5}


def test_routing_slip() -> None:
    slip = RoutingSlip(
        stages=[
            SlipStage(stage="retrieve"),
            SlipStage(stage="infer", params={"replicas": "3"}),
            SlipStage(stage="guard_out"),
        ]
    )
    assert slip.next_stage == "retrieve"
    step = slip.advanced()
    assert (step.next_stage, step.stage_params()) == ("infer", {"replicas": "3"})
    assert slip.current == 0  # advanced() returns a new slip
    done = step.advanced().advanced()
    assert done.next_stage is None and done.stage_params() == {}


def test_candidate_signing_payload() -> None:
    candidate = sample_event(
        CandidateAnswer, tenant="acme", request_id="r", replica_id="a", answer="42", signature=b""
    )
    assert candidate.digest() == answer_digest("42")
    payload = candidate.signing_payload()
    assert payload == candidate_signing_payload(
        tenant="acme",
        request_id="r",
        revision_round=0,
        replica_id="a",
        digest=answer_digest("42"),
    )
    assert candidate.model_copy(update={"answer": "43"}).signing_payload() != payload
    assert candidate.model_copy(update={"revision_round": 1}).signing_payload() != payload
    assert answer_digest("42", None) != answer_digest("42", "")
    # Length-prefixed parts: moving a character across a boundary changes the payload.
    assert candidate_signing_payload(
        tenant="ab", request_id="c", revision_round=0, replica_id="x", digest="d"
    ) != candidate_signing_payload(
        tenant="a", request_id="bc", revision_round=0, replica_id="x", digest="d"
    )


def test_quorum_certificate_is_verifiable_from_the_decision() -> None:
    candidate = sample_event(
        CandidateAnswer, tenant="t", request_id="r", replica_id="a", answer="yes", signature=b""
    )
    decided = sample_event(
        AnswerDecided,
        tenant="t",
        request_id="r",
        answer="yes",
        answer_digest=candidate.digest(),
        quorum_certificate=[
            {"replica_id": "a", "signature": b"s", "answer_digest": candidate.digest()}
        ],
    )
    entry = decided.quorum_certificate[0]
    rebuilt = candidate_signing_payload(
        tenant=decided.tenant,
        request_id=decided.request_id,
        revision_round=decided.revision_round,
        replica_id=entry.replica_id,
        digest=entry.answer_digest,
    )
    assert rebuilt == candidate.signing_payload()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(event=any_event())
def test_json_round_trip_for_clients(event: Event) -> None:
    """The console, `strata publish` and DLQ inspection speak JSON: every event survives it
    (bytes as base64, infinities as constants).  Parse JSON with ``model_validate_json``."""
    text = event.model_dump_json()
    assert type(event).model_validate_json(text) == event
