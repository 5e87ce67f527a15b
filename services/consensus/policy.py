"""The vote a slip asks for: mode, replicas expected (N), faults tolerated (f), quorum (q).

The slip's ``consensus`` stage carries ``{"mode", "replicas", "f"}`` (written by route).

| mode       | N          | q                              |
|------------|------------|--------------------------------|
| `single`   | 1          | 1                              |
| `majority` | ≥ 3        | ⌊N/2⌋ + 1 (2 of 3)             |
| `bft`      | ≥ 3f + 1   | max(2f + 1, ⌊N/2⌋ + 1)         |

Why the ⌊N/2⌋ + 1 floor in `bft`: with N > 3f + 1 (e.g. N = 7, f = 1) two disjoint sets of
2f + 1 could exist; a quorum that is also a majority of N can never be matched by a second
one, whoever the faulty replicas are.  For N = 3f + 1 the floor changes nothing.

The expected replicas are the *slots* 1..N: replica k is the identity ``<service>.r<k>``
(slot 1 is the bare service name, as in services/infer).  A vote is counted per slot, not
per identity, so ``infer`` and ``infer.r1`` can never both vote.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from stratamesh.bus.topics import Stage
from stratamesh.events import ConsensusMode, RoutingSlip

__all__ = ["PolicyError", "VotePolicy", "replica_slot"]

_REPLICA: Final = re.compile(r"\.r(\d+)$")


class PolicyError(ValueError):
    """The slip's consensus parameters are missing or inconsistent."""


def replica_slot(identity: str, service: str) -> int | None:
    """1 for ``service`` and ``service.r1``, k for ``service.r<k>``; None for anything else."""
    if identity == service:
        return 1
    if not identity.startswith(service + "."):
        return None
    match = _REPLICA.search(identity)
    if match is None or identity != f"{service}.r{match.group(1)}":
        return None
    k = int(match.group(1))
    return k if k >= 1 else None


@dataclass(frozen=True, slots=True)
class VotePolicy:
    mode: ConsensusMode
    replicas: int
    f: int

    def __post_init__(self) -> None:
        n, f = self.replicas, self.f
        if f < 0 or n < 1:
            raise PolicyError(f"replicas must be ≥ 1 and f ≥ 0, got N={n} f={f}")
        if self.mode is ConsensusMode.SINGLE and n != 1:
            raise PolicyError(f"single mode asks one replica, not {n}")
        if self.mode is ConsensusMode.MAJORITY and n < 3:
            raise PolicyError(f"majority needs at least 3 replicas, got {n}")
        if self.mode is ConsensusMode.BFT and (f < 1 or n < 3 * f + 1):
            raise PolicyError(f"bft needs f ≥ 1 and N ≥ 3f+1, got N={n} f={f}")

    @property
    def quorum(self) -> int:
        n = self.replicas
        if self.mode is ConsensusMode.SINGLE:
            return 1
        if self.mode is ConsensusMode.MAJORITY:
            return n // 2 + 1
        return max(2 * self.f + 1, n // 2 + 1)

    @property
    def slots(self) -> range:
        return range(1, self.replicas + 1)

    def params(self) -> dict[str, str]:
        return {"mode": self.mode.value, "replicas": str(self.replicas), "f": str(self.f)}

    @classmethod
    def from_params(cls, params: dict[str, str]) -> VotePolicy:
        try:
            mode = ConsensusMode(params.get("mode", ""))
        except ValueError:
            raise PolicyError(f"unknown consensus mode {params.get('mode')!r}") from None
        default_n = "1" if mode is ConsensusMode.SINGLE else ""
        try:
            n = int(params.get("replicas", default_n))
            f = int(params.get("f", "0"))
        except ValueError:
            raise PolicyError(f"non-numeric consensus parameters {params}") from None
        return cls(mode, n, f)

    @classmethod
    def from_slip(cls, slip: RoutingSlip) -> VotePolicy:
        """The policy of the slip's current stage, which must be ``consensus``."""
        if slip.next_stage != Stage.CONSENSUS:
            raise PolicyError(f"slip is addressed to {slip.next_stage!r}, not consensus")
        return cls.from_params(slip.stage_params())

    @classmethod
    def of_decided_slip(cls, slip: RoutingSlip) -> VotePolicy:
        """The policy of the consensus stage a decision's (advanced) slip has passed."""
        passed = [s for s in slip.stages[: slip.current] if s.stage == Stage.CONSENSUS]
        if not passed:
            raise PolicyError("the slip has passed no consensus stage")
        return cls.from_params(dict(passed[-1].params))
