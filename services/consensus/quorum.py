"""The vote itself: counting equivalence classes against the quorum, and the certificate.

A :class:`Ballot` is one candidate as the vote saw it: its slot, its replica, the digest
and signature, the equivalence class it joined (the seq of the class's first member), or
the reason it was rejected.  :func:`tally` is pure: the same ballots give the same
outcome, so an instance that restarts from the stored ballots decides exactly as the one
that died would have.

* **decided** as soon as one class holds q ballots (no waiting for stragglers: q > N/2,
  so no other class can ever reach q too);
* **impossible** as soon as the largest class plus the slots still silent is below q
  (rejected ballots spend their slot: a replica votes once, its first message counts);
* **pending** otherwise, until the collection window closes.

**The quorum certificate** is the list of ``QuorumSignature(replica_id, signature,
answer_digest)`` of the deciding class.  Each signature is the replica's Ed25519 signature
over ``candidate_signing_payload(tenant, request_id, revision_round, replica_id,
answer_digest)`` (``stratamesh.events.signing``: a fixed tag, then each part
length-prefixed), so anyone holding the replicas' public keys can re-verify a decision
from the ``AnswerDecided`` event alone (:func:`verify_certificate`): tenant, request id and
revision round are fields of the decision, replica and digest are in each entry, and the
mode, N and f are in the consensus stage the decision's slip has passed.  For structured
(exact) answers every entry's digest equals the decision's ``answer_digest``; for free
text the entries may sign different but equivalent texts, and the certificate proves who
signed what, not that the texts are equivalent (that needs the texts; the decided one is
always a member, so its digest is always in the certificate).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Final

from stratamesh.errors import SecurityError
from stratamesh.events import AnswerDecided, QuorumSignature, answer_digest
from stratamesh.events.signing import candidate_signing_payload
from stratamesh.security.keys import Keyring

from .policy import PolicyError, VotePolicy, replica_slot

__all__ = [
    "Ballot",
    "Outcome",
    "Reason",
    "Tally",
    "certificate",
    "tally",
    "verify_certificate",
]


class Reason:
    """``Dissent.reason`` values (and the label of strata_consensus_rejected_total)."""

    DIFFERENT_ANSWER: Final = "different_answer"
    TIMEOUT: Final = "timeout"  # expected, silent when the window closed
    NOT_WAITED: Final = "not_waited"  # still silent when the quorum was reached
    REPLICA_MISMATCH: Final = "replica_mismatch"
    UNEXPECTED_REPLICA: Final = "unexpected_replica"
    UNKNOWN_SIGNER: Final = "unknown_signer"
    BAD_SIGNATURE: Final = "bad_signature"
    DUPLICATE_SIGNER: Final = "duplicate_signer"
    EQUIVOCATION: Final = "equivocation"  # the same replica, a different signed answer
    POLICY_MISMATCH: Final = "policy_mismatch"
    BAD_POLICY: Final = "bad_policy"
    NO_ANSWER: Final = "no_answer"


class Outcome(Enum):
    PENDING = "pending"
    DECIDED = "decided"
    IMPOSSIBLE = "impossible"


@dataclass(frozen=True, slots=True)
class Ballot:
    seq: int  # arrival order within the request
    slot: int | None  # None: not one of the slip's replicas (never counted)
    replica_id: str
    event_id: str
    digest: str
    signature: bytes
    model: str
    klass: int | None = None  # seq of the class's first ballot; None when rejected
    reason: str | None = None

    @property
    def counted(self) -> bool:
        return self.reason is None and self.klass is not None


@dataclass(frozen=True, slots=True)
class Tally:
    outcome: Outcome
    quorum: int
    classes: dict[int, list[Ballot]]  # class → its ballots in arrival order
    winner: int | None  # the deciding class
    silent: list[int]  # expected slots that have not voted

    @property
    def votes_total(self) -> int:
        return sum(len(b) for b in self.classes.values())

    def largest(self) -> list[int]:
        """Classes in decreasing size, earlier classes first on ties."""
        return sorted(self.classes, key=lambda k: (-len(self.classes[k]), k))


def tally(policy: VotePolicy, ballots: Iterable[Ballot]) -> Tally:
    classes: dict[int, list[Ballot]] = {}
    spent: set[int] = set()
    for b in sorted(ballots, key=lambda b: b.seq):
        if b.slot is None or b.slot not in policy.slots or b.slot in spent:
            continue  # outsiders and later ballots of a slot never count
        spent.add(b.slot)
        if b.counted and b.klass is not None:
            classes.setdefault(b.klass, []).append(b)
    silent = [s for s in policy.slots if s not in spent]
    q = policy.quorum
    order = sorted(classes, key=lambda k: (-len(classes[k]), k))
    best = len(classes[order[0]]) if order else 0
    if best >= q:
        return Tally(Outcome.DECIDED, q, classes, order[0], silent)
    if best + len(silent) < q:
        return Tally(Outcome.IMPOSSIBLE, q, classes, None, silent)
    return Tally(Outcome.PENDING, q, classes, None, silent)


def certificate(ballots: Sequence[Ballot]) -> list[QuorumSignature]:
    return [
        QuorumSignature(replica_id=b.replica_id, signature=b.signature, answer_digest=b.digest)
        for b in ballots
    ]


def verify_certificate(
    decision: AnswerDecided, keyring: Keyring, *, service: str = "infer"
) -> list[str]:
    """Problems with ``decision``'s quorum certificate; empty when a third party holding
    the replicas' public keys can confirm that a quorum of distinct expected replicas
    signed it."""
    problems: list[str] = []
    try:
        policy = VotePolicy.of_decided_slip(decision.slip)
    except PolicyError as exc:
        return [f"no consensus policy on the slip: {exc}"]
    if policy.mode != decision.mode:
        problems.append(f"mode {decision.mode} but the slip asked {policy.mode}")
    if decision.answer_digest != answer_digest(decision.answer, decision.structured):
        problems.append("answer_digest is not the digest of the decided answer")
    slots: set[int] = set()
    valid = 0
    for entry in decision.quorum_certificate:
        slot = replica_slot(entry.replica_id, service)
        if slot is None or slot not in policy.slots:
            problems.append(f"{entry.replica_id} is not one of the {policy.replicas} replicas")
            continue
        if slot in slots:
            problems.append(f"replica slot {slot} signs twice")
            continue
        payload = candidate_signing_payload(
            tenant=decision.tenant,
            request_id=decision.request_id,
            revision_round=decision.revision_round,
            replica_id=entry.replica_id,
            digest=entry.answer_digest,
        )
        try:
            keyring.verify(entry.replica_id, payload, entry.signature)
        except SecurityError as exc:
            problems.append(f"{entry.replica_id}: {exc}")
            continue
        slots.add(slot)
        valid += 1
    if valid < policy.quorum:
        problems.append(f"{valid} valid signatures, the quorum is {policy.quorum}")
    if decision.votes_for != len(decision.quorum_certificate):
        problems.append("votes_for differs from the certificate's size")
    if decision.answer_digest not in {e.answer_digest for e in decision.quorum_certificate}:
        problems.append("the decided answer is not signed by any certificate member")
    return problems
