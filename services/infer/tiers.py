"""Degradation tiers with hysteresis: full → reduced model → extractive answer from chunks.

::

              `degrade_after` failed requests in a row at the current tier
    FULL ─────────────────────────────────► REDUCED ─────────────────────────► EXTRACTIVE
      ▲                                        │  ▲                                 │
      └── `recover_probes` probes succeeded ───┘  └── `recover_probes` succeeded ───┘
          (probing starts `recover_after_s` after the last change or failed probe)

Hysteresis is the asymmetry: a few failures step down at once, while stepping up needs a
quiet period *and* several successful probe requests one tier up, so a flapping backend
does not make the served quality flap with it.  While degraded, one request at a time is
a probe (served one tier up, falling back within the request if it fails); the rest go
straight to the degraded tier, so they pay no timeout for a backend known to be down.

A request is never refused here: when its tier fails it falls through to the tiers below
inside the same request (extractive needs no model at all), and the outcome of each tier
it tried is reported back with :meth:`Degradation.record`.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog

__all__ = ["Degradation", "Plan", "Tier"]

log = structlog.get_logger("stratamesh.infer")


class Tier(enum.IntEnum):
    """Served quality, best first; ``label`` is ``CandidateAnswer.degradation``."""

    FULL = 0
    REDUCED = 1
    EXTRACTIVE = 2

    @property
    def label(self) -> str:
        return self.name.lower()


@dataclass(frozen=True, slots=True)
class Plan:
    """The tiers one request tries, in order, and whether its first one is a probe."""

    tiers: tuple[Tier, ...]
    probe: bool


class Degradation:
    def __init__(
        self,
        *,
        degrade_after: int = 3,
        recover_after_s: float = 30.0,
        recover_probes: int = 3,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if degrade_after < 1 or recover_probes < 1:
            raise ValueError("degrade_after and recover_probes must be ≥ 1")
        self.degrade_after = degrade_after
        self.recover_after_s = recover_after_s
        self.recover_probes = recover_probes
        self._clock = clock
        self._tier = Tier.FULL
        self._failures = 0  # consecutive failures at the current tier
        self._probe_successes = 0
        self._probe_in_flight = False
        self._quiet_since = clock()  # last tier change or failed probe

    @property
    def tier(self) -> Tier:
        return self._tier

    def plan(self) -> Plan:
        """The tiers to try for the next request."""
        start = self._tier
        probe = False
        if (
            self._tier > Tier.FULL
            and not self._probe_in_flight
            and self._clock() - self._quiet_since >= self.recover_after_s
        ):
            start = Tier(self._tier - 1)
            probe = True
            self._probe_in_flight = True
        return Plan(tuple(Tier(t) for t in range(start, len(Tier))), probe)

    def record(self, plan: Plan, tier: Tier, ok: bool) -> None:
        """The outcome of serving ``tier`` for a request planned as ``plan``."""
        if plan.probe and tier == plan.tiers[0]:
            self._probe_in_flight = False
            if tier != self._tier - 1:
                return  # the tier moved while the probe ran: it decides nothing
            if ok:
                self._probe_successes += 1
                if self._probe_successes >= self.recover_probes:
                    self._move(tier)
            else:
                self._probe_successes = 0
                self._quiet_since = self._clock()
            return
        if tier != self._tier:
            return  # a lower tier answering after the current one failed: no news about it
        if ok:
            self._failures = 0
            return
        self._failures += 1
        if self._failures >= self.degrade_after and self._tier < Tier.EXTRACTIVE:
            self._move(Tier(self._tier + 1))

    def release(self, plan: Plan) -> None:
        """The request ended without an outcome for its probe tier (e.g. cancelled)."""
        if plan.probe:
            self._probe_in_flight = False

    def _move(self, tier: Tier) -> None:
        log.warning("degradation tier changed", previous=self._tier.label, tier=tier.label)
        self._tier = tier
        self._failures = 0
        self._probe_successes = 0
        self._probe_in_flight = False
        self._quiet_since = self._clock()
