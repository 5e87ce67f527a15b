from __future__ import annotations

import pytest

from stratamesh.bus import topics
from stratamesh.obs.tracing import TraceContext


def test_traceparent_round_trip_and_child() -> None:
    ctx = TraceContext.new()
    parsed = TraceContext.parse(ctx.header)
    assert parsed == ctx
    child = ctx.child()
    assert child.trace_id == ctx.trace_id and child.span_id != ctx.span_id


@pytest.mark.parametrize(
    "bad",
    [
        None,
        b"",
        b"garbage",
        "01-abc",
        b"00-" + b"0" * 32 + b"-" + b"1" * 16 + b"-01",
        b"00-" + b"g" * 32 + b"-" + b"1" * 16 + b"-01",
    ],
)
def test_malformed_traceparent_is_ignored(bad: bytes | str | None) -> None:
    assert TraceContext.parse(bad) is None


def test_registry_covers_design_and_has_dlq_twins() -> None:
    names = {t.name for t in topics.TOPICS}
    assert {
        "docs.submitted",
        "docs.chunked",
        "docs.embedded",
        "docs.indexed",
        "docs.rejected",
        "requests.submitted",
        "requests.admitted",
        "requests.routed",
        "requests.embedded",
        "requests.retrieved",
        "inference.completed",
        "requests.decided",
        "requests.judged",
        "results",
        "reviews.pending",
    } <= names
    assert len(topics.ALL_TOPICS) == 2 * len(topics.TOPICS)
    assert all(t.dlq in topics.ALL_TOPICS for t in topics.TOPICS)
    assert len({t.event_type for t in topics.TOPICS}) == len(topics.TOPICS)


def test_producer_permissions() -> None:
    submitted = topics.topic(topics.REQUESTS_SUBMITTED)
    assert submitted.allows("client:acme-web") and submitted.allows("console")
    assert not submitted.allows("guard")
    completed = topics.topic(topics.INFERENCE_COMPLETED)
    assert completed.allows("infer.r1") and completed.allows("infer")
    assert not completed.allows("client:x") and not completed.allows("inferx")
    assert topics.topic("shadow.results.dlq").name == "results"
    with pytest.raises(KeyError, match="known topics"):
        topics.topic("nope")
