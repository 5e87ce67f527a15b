"""Human review on the real broker: an escalation on reviews.pending is listed, decided with
the operator's tools (stratamesh.reviews, what `strata review` runs), and guard completes the
request on results — once per review, with PII in an edited answer pseudonymised."""

from __future__ import annotations

from typing import Any

import pytest

from stratamesh.bus import topics as T
from stratamesh.bus.codec import Codec
from stratamesh.errors import ConfigError
from stratamesh.events import (
    Citation,
    CompletionStatus,
    HumanReviewRequested,
    Priority,
    RequestCompleted,
    ReviewCandidate,
    ReviewDecision,
    new_event_id,
)
from stratamesh.events.testing import sample_event
from stratamesh.reviews import CONSOLE_IDENTITY, decide, find_review, load_reviews
from stratamesh.services.guard.app import build_service
from tests.integration.conftest import Env
from tests.integration.test_bus import read_all

CITATION = Citation(
    doc_id="handbook/refunds", doc_version=2, chunk_id="c-1", text="Refunds take 14 days."
)


def escalation(tenant: str, request_id: str) -> HumanReviewRequested:
    return sample_event(
        HumanReviewRequested,
        event_id=new_event_id(),
        tenant=tenant,
        request_id=request_id,
        priority=Priority.PRO,
        deadline_ms=1,  # long past: a human decides anyway
        reason="no quorum: 1 of 3 replicas agree",
        candidates=[
            ReviewCandidate(answer="Refunds take 14 days [1].", citations=[CITATION]),
            ReviewCandidate(answer="Refunds are instant."),
        ],
    )


def results(codec: Codec, records: list[Any]) -> dict[str, list[RequestCompleted]]:
    out: dict[str, list[RequestCompleted]] = {}
    for r in records:
        ev = codec.decode(r.value)
        assert isinstance(ev, RequestCompleted)
        out.setdefault(ev.request_id, []).append(ev)
    return out


async def test_decisions_complete_escalated_requests_once(env: Env, unique: str) -> None:
    tenant = f"acme-{unique}"
    env.identity(CONSOLE_IDENTITY)
    guard_pub = await env.publisher("guard")  # escalations come from guard or consensus
    await env.start(build_service())
    for rid in ("approve", "edit", "reject"):
        await guard_pub.publish(escalation(tenant, rid), topic_name=T.REVIEWS_PENDING)

    reviews = await load_reviews(env.settings)
    mine = [r for r in reviews if r.request.tenant == tenant]
    assert sorted(r.request.request_id for r in mine) == ["approve", "edit", "reject"]
    assert all(r.pending for r in mine)

    await decide(env.settings, find_review(mine, "approve"), ReviewDecision.APPROVE, reviewer="ana")
    await decide(
        env.settings,
        find_review(mine, "edit"),
        ReviewDecision.EDIT,
        reviewer="ana",
        answer="Write to maria.schmidt@example.net for a refund.",
    )
    reject = await decide(
        env.settings,
        find_review(mine, "reject"),
        ReviewDecision.REJECT,
        reviewer="bo",
        note="not grounded",
    )
    # A second reviewer racing the first: published (their view was stale), never released.
    await decide(env.settings, find_review(mine, "reject"), ReviewDecision.APPROVE, reviewer="cy")

    codec = Codec()
    got = results(codec, await read_all(env.settings, T.RESULTS, 3, timeout=30))
    assert {k: len(v) for k, v in got.items()} == {"approve": 1, "edit": 1, "reject": 1}

    approved = got["approve"][0]
    assert approved.status == CompletionStatus.OK
    assert approved.answer == "Refunds take 14 days [1]." and approved.citations == [CITATION]
    assert approved.versions["review"] == "approve:ana"
    assert approved.review_event_id == find_review(mine, "approve").review_id

    edited = got["edit"][0]
    assert edited.status == CompletionStatus.OK and edited.answer is not None
    # The default tenant policy does not re-identify: the address stays a pseudonym.
    assert "maria.schmidt@example.net" not in edited.answer and "<EMAIL_" in edited.answer
    assert any(f.scanner == "pii" for f in edited.findings)

    rejected = got["reject"][0]
    assert rejected.status == CompletionStatus.BLOCKED and rejected.answer is None
    assert rejected.reason == "rejected in human review: not grounded"
    assert rejected.versions["review"] == "reject:bo"

    # The operator's view now shows them decided, first decision first; deciding again is
    # refused with who decided.
    after = {
        r.request.request_id: r
        for r in await load_reviews(env.settings)
        if r.request.tenant == tenant
    }
    assert not any(r.pending for r in after.values())
    assert after["reject"].decision is not None
    assert after["reject"].decision.event_id == reject.event_id
    with pytest.raises(ConfigError, match="already decided"):
        await decide(env.settings, after["edit"], ReviewDecision.REJECT, reviewer="dee")


async def test_find_review_needs_an_unambiguous_reference(env: Env, unique: str) -> None:
    tenant = f"acme-{unique}"
    guard_pub = await env.publisher("guard")
    await guard_pub.publish(escalation(tenant, f"one-{unique}"), topic_name=T.REVIEWS_PENDING)
    await guard_pub.publish(escalation(tenant, f"two-{unique}"), topic_name=T.REVIEWS_PENDING)
    reviews = await load_reviews(env.settings)
    assert find_review(reviews, f"two-{unique}").request.request_id == f"two-{unique}"
    with pytest.raises(ConfigError, match="no review"):
        find_review(reviews, "nope")
    one = find_review(reviews, f"one-{unique}")
    with pytest.raises(ConfigError, match="candidate"):
        await decide(env.settings, one, ReviewDecision.APPROVE, reviewer="ana", candidate=3)
