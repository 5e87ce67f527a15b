"""What a replica signs (DESIGN.md §4, infer and consensus).

A candidate answer's signature covers :func:`candidate_signing_payload`: the tenant, the
request, the revision round, the replica and the SHA-256 digest of the answer.  Everything
in it is also in an ``AnswerDecided`` (the digest and replica in each quorum-certificate
entry), so a quorum certificate can be verified from the decision alone, e.g. by audit.
Key management and the Ed25519 operations live in ``stratamesh.security``.
"""

from __future__ import annotations

import hashlib
from typing import Final

__all__ = ["CANDIDATE_PAYLOAD_TAG", "answer_digest", "candidate_signing_payload"]

CANDIDATE_PAYLOAD_TAG: Final = b"stratamesh/candidate-answer/v1"


def answer_digest(answer: str, structured: str | None = None) -> str:
    """SHA-256 hex of an answer and its structured form (exact bytes, no normalisation)."""
    h = hashlib.sha256()
    h.update(answer.encode())
    h.update(b"\x00")
    if structured is not None:
        h.update(b"\x01")
        h.update(structured.encode())
    return h.hexdigest()


def candidate_signing_payload(
    *, tenant: str, request_id: str, revision_round: int, replica_id: str, digest: str
) -> bytes:
    """The bytes a replica signs for one candidate answer.

    The tag, then each part as a 4-byte big-endian length and its UTF-8 bytes: unambiguous
    whatever the parts contain.
    """
    out = bytearray(CANDIDATE_PAYLOAD_TAG)
    for part in (tenant, request_id, str(revision_round), replica_id, digest):
        raw = part.encode()
        out += len(raw).to_bytes(4, "big") + raw
    return bytes(out)
