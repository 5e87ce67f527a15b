"""The vote's pure logic: quorum sizes, the tally, equivalence keys, certificate checks."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from stratamesh.events import AnswerDecided, ConsensusMode, QuorumSignature, answer_digest
from stratamesh.events.signing import candidate_signing_payload
from stratamesh.events.testing import sample_event
from stratamesh.security.keys import Keyring, SigningKey
from stratamesh.services.consensus.equivalence import canonical_json, key_of, normalise
from stratamesh.services.consensus.policy import PolicyError, VotePolicy, replica_slot
from stratamesh.services.consensus.quorum import Ballot, Outcome, tally, verify_certificate

from .test_consensus_support import consensus_slip, replica_name


@pytest.mark.parametrize(
    ("mode", "n", "f", "q"),
    [
        ("single", 1, 0, 1),
        ("majority", 3, 0, 2),
        ("majority", 5, 0, 3),
        ("bft", 4, 1, 3),
        ("bft", 7, 2, 5),
        ("bft", 7, 1, 4),
        ("bft", 10, 3, 7),
    ],
)
def test_quorum_sizes(mode: str, n: int, f: int, q: int) -> None:
    assert VotePolicy(ConsensusMode(mode), n, f).quorum == q


@pytest.mark.parametrize(
    "params",
    [
        {"mode": "bft", "replicas": "3", "f": "1"},
        {"mode": "bft", "replicas": "4", "f": "0"},
        {"mode": "majority", "replicas": "2"},
        {"mode": "single", "replicas": "2"},
        {"mode": "raft", "replicas": "3"},
        {"mode": "bft", "replicas": "x", "f": "1"},
    ],
)
def test_inconsistent_policies_are_refused(params: dict[str, str]) -> None:
    with pytest.raises(PolicyError):
        VotePolicy.from_params(params)


def test_replica_slots() -> None:
    assert [replica_slot(i, "infer") for i in ("infer", "infer.r1", "infer.r7")] == [1, 1, 7]
    assert [replica_slot(i, "infer") for i in ("guard", "infer.x2", "inferx.r2")] == [None] * 3
    assert VotePolicy.from_slip(consensus_slip("bft", 4, 1)) == VotePolicy(ConsensusMode.BFT, 4, 1)


def ballot(seq: int, slot: int | None, klass: int | None, reason: str | None = None) -> Ballot:
    return Ballot(seq, slot, f"r{slot}", f"e{seq}", "d", b"s", "m", klass, reason)


def test_tally_decides_at_quorum_is_impossible_early_and_counts_a_slot_once() -> None:
    bft = VotePolicy(ConsensusMode.BFT, 4, 1)
    assert tally(bft, [ballot(1, 1, 1), ballot(2, 2, 1)]).outcome is Outcome.PENDING
    done = tally(bft, [ballot(1, 1, 1), ballot(2, 2, 1), ballot(3, 3, 1)])
    assert done.outcome is Outcome.DECIDED and done.winner == 1 and done.silent == [4]
    # Two classes of 2: 3 matching are impossible with nobody left.
    split = [ballot(1, 1, 1), ballot(2, 2, 2), ballot(3, 3, 1), ballot(4, 4, 2)]
    assert tally(bft, split).outcome is Outcome.IMPOSSIBLE
    # A rejected ballot spends its slot; the same slot again and outsiders never count.
    spent = [
        ballot(1, 1, None, "bad_signature"),
        ballot(2, 1, 1),
        ballot(3, 9, 1),
        ballot(4, 2, 1),
        ballot(5, 3, 1),
    ]
    t = tally(bft, spent)
    assert t.outcome is Outcome.PENDING and len(t.classes[1]) == 2 and t.silent == [4]
    spent.append(ballot(6, 4, 7))
    assert tally(bft, spent).outcome is Outcome.IMPOSSIBLE


def test_structured_equivalence_is_exact_canonical_json() -> None:
    assert canonical_json('{"b": [1, 2], "a": "é"}') == '{"a":"é","b":[1,2]}'
    a, b = key_of("", '{"a": 1, "b": 2}'), key_of("", '{"b":2,"a":1}')
    assert a.cheap_verdict(b) is True
    assert a.cheap_verdict(key_of("", '{"a": 1.0, "b": 2}')) is False
    assert a.cheap_verdict(key_of('{"a": 1, "b": 2}', None)) is False  # free text ≠ structured
    assert key_of("", "not json").cheap_verdict(key_of("", "not json")) is True


def test_free_text_normalisation_and_guards() -> None:
    assert normalise("The answer  is  PARIS [2].") == "the answer is paris"
    right = key_of("It was completed in 1889 [1].", None)
    assert right.cheap_verdict(key_of("it was COMPLETED in 1889", None)) is True
    assert right.cheap_verdict(key_of("It was completed in 1899.", None)) is False
    assert right.cheap_verdict(key_of("It wasn't completed in 1889.", None)) is False
    assert right.cheap_verdict(key_of("Its construction ended in 1889.", None)) is None
    assert key_of("", None).cheap_verdict(key_of("Paris", None)) is False


def _decision(keys: dict[int, SigningKey], signers: list[int], answer: str) -> AnswerDecided:
    digest = answer_digest(answer)
    cert = [
        QuorumSignature(
            replica_id=replica_name(k),
            signature=keys[k].sign(
                candidate_signing_payload(
                    tenant="t",
                    request_id="q",
                    revision_round=0,
                    replica_id=replica_name(k),
                    digest=digest,
                )
            ),
            answer_digest=digest,
        )
        for k in signers
    ]
    slip = consensus_slip("bft", 4, 1).advanced()
    return sample_event(
        AnswerDecided,
        tenant="t",
        request_id="q",
        slip=slip,
        answer=answer,
        answer_digest=digest,
        mode="bft",
        votes_for=len(cert),
        quorum_certificate=cert,
    )


def test_a_certificate_is_verifiable_from_the_decision_alone() -> None:
    keys = {k: SigningKey(replica_name(k), Ed25519PrivateKey.generate()) for k in range(1, 6)}
    ring = Keyring()
    for key in keys.values():
        ring.add(key.identity, key.public_bytes)
    assert verify_certificate(_decision(keys, [1, 2, 4], "yes"), ring) == []
    assert any("quorum is 3" in p for p in verify_certificate(_decision(keys, [1, 2], "y"), ring))
    outsider = verify_certificate(_decision(keys, [1, 2, 5], "yes"), ring)
    assert any("not one of the 4" in p for p in outsider)
    good = _decision(keys, [1, 2, 3], "yes")
    tampered = good.model_copy(update={"request_id": "another"})  # replayed elsewhere
    assert any("does not verify" in p for p in verify_certificate(tampered, ring))
    twice = good.model_copy(
        update={"quorum_certificate": [*good.quorum_certificate[:2], good.quorum_certificate[0]]}
    )
    assert any("signs twice" in p for p in verify_certificate(twice, ring))
    other = good.model_copy(update={"answer": "no", "answer_digest": answer_digest("no")})
    assert any("not signed by any" in p for p in verify_certificate(other, ring))
