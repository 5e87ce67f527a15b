"""The replica registry: who may vote, with which key, and what each replica is.

Built from the keyring (every ``<replica_service>[.r<k>]`` public key in the keys folder)
and ``settings.consensus.replicas`` (identity → model, backend, seed: the deployment's
record of how replicas differ, so correlated failures are visible in every decision).
When that setting names replicas, it is an allow-list: other keys are unknown signers.

What the bus already guarantees before a candidate reaches the vote (middleware.py):
the record's envelope is signed by its ``strata-producer``, that producer has a trusted
key and is allowed on ``inference.completed`` (any ``infer.*``), the payload's event id
and tenant match the headers, and an event id is handled once per consumer group.

What only the vote can check, and :meth:`ReplicaRegistry.check` does:

* ``replica_mismatch`` — the payload's ``replica_id`` is not the authenticated producer: a
  replica re-publishing another replica's (validly signed) answer as its own vote;
* ``unexpected_replica`` — the producer is not one of the slots 1..N the slip asks for;
* ``unknown_signer`` — no registered key for the replica;
* ``bad_signature`` — the candidate signature does not verify over
  ``CandidateAnswer.signing_payload()`` (tenant, request, revision round, replica, answer
  digest): a forged answer, or an old answer replayed into another request or round;
* ``no_answer`` — an empty or expired candidate: the replica spent its vote on nothing.

Duplicates (the same slot voting twice) and policy mismatches are state-dependent and
checked by the aggregator (:mod:`.aggregate`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from stratamesh.errors import SecurityError
from stratamesh.events import CandidateAnswer
from stratamesh.security.keys import Keyring

from .policy import VotePolicy, replica_slot
from .quorum import Reason

__all__ = ["ReplicaInfo", "ReplicaRegistry"]

EXPIRED = "expired"  # CandidateAnswer.degradation of a replica that ran out of time


@dataclass(frozen=True, slots=True)
class ReplicaInfo:
    identity: str
    slot: int
    fingerprint: str  # SHA-256 hex (16 chars) of the raw Ed25519 public key
    model: str | None = None
    backend: str | None = None
    seed: str | None = None

    def describe(self) -> str:
        parts = [f"key {self.fingerprint}"]
        parts += [
            f"{k} {v}"
            for k, v in (("model", self.model), ("backend", self.backend), ("seed", self.seed))
            if v
        ]
        return f"{self.identity} ({', '.join(parts)})"


class ReplicaRegistry:
    def __init__(
        self,
        keyring: Keyring,
        *,
        service: str = "infer",
        profiles: Mapping[str, Mapping[str, str]] | None = None,
    ) -> None:
        self.keyring = keyring
        self.service = service
        self.profiles = {k: dict(v) for k, v in (profiles or {}).items()}
        self._cache: dict[str, ReplicaInfo | None] = {}

    def get(self, identity: str) -> ReplicaInfo | None:
        """The replica behind ``identity``; None when it is not a known replica signer."""
        if identity in self._cache:
            return self._cache[identity]
        info = self._lookup(identity)
        self._cache[identity] = info
        return info

    def _lookup(self, identity: str) -> ReplicaInfo | None:
        slot = replica_slot(identity, self.service)
        if slot is None or (self.profiles and identity not in self.profiles):
            return None
        try:
            public = self.keyring.public_key(identity)
        except SecurityError:
            return None
        raw = public.public_bytes(Encoding.Raw, PublicFormat.Raw)
        profile = self.profiles.get(identity, {})
        return ReplicaInfo(
            identity=identity,
            slot=slot,
            fingerprint=hashlib.sha256(raw).hexdigest()[:16],
            model=profile.get("model"),
            backend=profile.get("backend"),
            seed=profile.get("seed"),
        )

    @property
    def known(self) -> list[ReplicaInfo]:
        """Every replica the registry knows (for logs at start-up)."""
        names = self.profiles or {
            i for i in self.keyring.identities if replica_slot(i, self.service) is not None
        }
        return sorted(
            (info for n in names if (info := self.get(n)) is not None), key=lambda r: r.slot
        )

    def verify(self, replica_id: str, payload: bytes, signature: bytes) -> bool:
        info = self.get(replica_id)
        if info is None:
            return False
        try:
            self.keyring.public_key(replica_id).verify(signature, payload)
        except (InvalidSignature, SecurityError, ValueError):
            return False
        return True

    def check(self, candidate: CandidateAnswer, producer: str, policy: VotePolicy) -> str | None:
        """Why ``candidate`` (authenticated as ``producer``) may not vote; None if it may."""
        if candidate.replica_id != producer:
            return Reason.REPLICA_MISMATCH
        slot = replica_slot(producer, self.service)
        if slot is None or slot not in policy.slots:
            return Reason.UNEXPECTED_REPLICA
        if self.get(producer) is None:
            return Reason.UNKNOWN_SIGNER
        if not self.verify(producer, candidate.signing_payload(), candidate.signature):
            return Reason.BAD_SIGNATURE
        if candidate.degradation == EXPIRED or not (candidate.answer or candidate.structured):
            return Reason.NO_ANSWER
        return None
