"""One request's aggregation: judge each candidate, store its ballot, tally, end it once.

    candidate ─► policy + registry checks ─► duplicate / equivocation check against the
             stored ballots ─► equivalence class ─► ballot stored (Redis, atomic)
             ─► tally ─► decided | impossible → outcome written once → published
    timer (window closed, any instance) ─► escalation (or the configured fallback)

The slip's policy is pinned by the request's first valid ballot; a later candidate whose
slip asks another vote is rejected (``policy_mismatch``).  Limitation: the slip reaches
consensus through the replicas, which could rewrite it; a faulty replica that is *first*
with a weaker but well-formed policy pins it (or, with `single` accepted, decides alone as
replica 1).  Only route can vouch for the policy (it would have to sign it, or consensus
read it from requests.routed); until then `accept_single=False` closes the lone-replica case.
"""

from __future__ import annotations

import base64
import os
import socket
import time
import uuid
from collections.abc import Sequence
from typing import Any, Final, Protocol

import redis.asyncio as aioredis
import structlog

from stratamesh.bus.envelope import now_ms
from stratamesh.bus.middleware import Context
from stratamesh.bus.topics import SHADOW_PREFIX
from stratamesh.config import ConsensusSettings, Settings
from stratamesh.errors import ConfigError
from stratamesh.events import CandidateAnswer, ConsensusMode
from stratamesh.models.embedders import Embedder, LocalEmbedder
from stratamesh.security.keys import Keyring
from stratamesh.stores.redis import open_redis

from .equivalence import Equivalence, key_of
from .metrics import ConsensusMetrics, consensus_metrics
from .outcomes import (
    DECIDED,
    ESCALATED,
    FALLBACK,
    Emission,
    Voted,
    decision,
    emissions_of,
    escalation,
    stored_outcome,
)
from .policy import PolicyError, VotePolicy, replica_slot
from .quorum import Ballot, Outcome, Reason, Tally, tally
from .registry import ReplicaRegistry
from .state import DONE, SLOT_TAKEN, STALE, ConsensusState, Snapshot

__all__ = ["TIMER", "Consensus", "Sink"]

log = structlog.get_logger("stratamesh.consensus")

TIMER: Final = "timer"  # the trigger of outcomes the window's end produced
VERSION: Final = "consensus/v1"
_FOUNDER: Final = -1  # stored klass of a ballot that founds its own class


class Sink(Protocol):
    """Where the sweeper's outcomes go (the service's producer; a list in tests)."""

    async def send(self, emissions: Sequence[Emission]) -> None: ...


def _ballot(seq: int, raw: dict[str, Any]) -> Ballot:
    klass = raw.get("klass")
    return Ballot(
        seq=seq,
        slot=raw.get("slot"),
        replica_id=raw["replica"],
        event_id=raw["event"],
        digest=raw["digest"],
        signature=base64.b64decode(raw["sig"]),
        model=raw["model"],
        klass=seq if klass == _FOUNDER else klass,
        reason=raw.get("reason"),
    )


def _ballots(snap: Snapshot) -> list[Ballot]:
    return [_ballot(seq, raw) for seq, raw in sorted(snap.ballots.items())]


def _voted(
    snap: Snapshot, ballots: Sequence[Ballot], known: dict[int, CandidateAnswer] | None = None
) -> list[Voted]:
    """The ballots with their candidates: the stored JSON parsed, except for ``known``
    (seq → the event whose JSON this very handler stored at that seq)."""
    known = known or {}
    return [
        Voted(
            b,
            known.get(b.seq)
            or CandidateAnswer.model_validate_json(snap.ballots[b.seq]["candidate"]),
        )
        for b in ballots
    ]


class Consensus:
    """The consensus engine of one process (shared by the service and its variants)."""

    def __init__(self) -> None:
        self.settings: Settings | None = None
        self.registry: ReplicaRegistry | None = None
        self.equivalence: Equivalence | None = None
        self.metrics: ConsensusMetrics = consensus_metrics()
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._keyring: Keyring | None = None
        self._embedder: Embedder | None = None
        self._redis: aioredis.Redis | None = None
        self._states: dict[str, ConsensusState] = {}

    # -- configuration --------------------------------------------------------------------

    @property
    def cfg(self) -> ConsensusSettings:
        if self.settings is None:
            raise ConfigError("the consensus service is not bound to settings")
        return self.settings.consensus

    def bind(self, settings: Settings) -> None:
        if self.settings is settings:
            return
        self.settings = settings
        cfg = settings.consensus
        keyring = self._keyring or Keyring.load(settings.keys_dir)
        self.registry = ReplicaRegistry(keyring, service=cfg.replica_service, profiles=cfg.replicas)
        self.equivalence = Equivalence(self._make_embedder, cfg.similarity_threshold)
        if self._redis is None:
            self._redis = open_redis(settings)
        self._states.clear()

    def use_keyring(self, keyring: Keyring) -> None:
        """Trust these replica keys (tests; keys held outside the keys folder)."""
        self._keyring = keyring
        if self.settings is not None and self.registry is not None:
            self.registry = ReplicaRegistry(
                keyring, service=self.cfg.replica_service, profiles=self.cfg.replicas
            )

    def use_embedder(self, embedder: Embedder) -> None:
        """Share an already loaded embedder (tests; `strata up` with embed in-process)."""
        self._embedder = embedder

    def _make_embedder(self) -> Embedder:
        if self._embedder is None:
            self._embedder = LocalEmbedder.shared(self.cfg.embed_model)
        return self._embedder

    async def warm(self) -> None:
        """Load the embedding model now (before the consumer takes partitions)."""
        _, equivalence = self._ready()
        if self.cfg.warm_embedder:
            await equivalence.warm()

    def state(self, namespace: str = "") -> ConsensusState:
        found = self._states.get(namespace)
        if found is None:
            if self._redis is None:
                raise ConfigError("the consensus service is not bound to settings")
            found = self._states[namespace] = ConsensusState(
                self._redis, namespace=self.cfg.key_scope + namespace, ttl_s=self.cfg.state_ttl_s
            )
        return found

    def _ready(self) -> tuple[ReplicaRegistry, Equivalence]:
        if self.registry is None or self.equivalence is None:
            raise ConfigError("the consensus service is not bound to settings")
        return self.registry, self.equivalence

    def versions(self) -> dict[str, str]:
        _, eq = self._ready()
        return {"consensus": f"{VERSION} {eq.describe()} embed={self.cfg.embed_model}"}

    async def close(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None
        self._states.clear()
        self.settings = None

    # -- a candidate ----------------------------------------------------------------------

    async def on_candidate(self, event: CandidateAnswer, ctx: Context) -> None:
        started = time.perf_counter()
        namespace = SHADOW_PREFIX if ctx.record.topic.startswith(SHADOW_PREFIX) else ""
        state = self.state(namespace)
        key = state.key(event.tenant, event.request_id, event.revision_round)
        # Judged against this process's last view of the request (no read); the store is
        # conditional on it, and a stale view comes back refreshed from the same call.
        snap = state.view(key)
        mine: dict[int, CandidateAnswer] = {}  # the ballot this handler stored: seq → event
        for _ in range(4):  # a stale view, or a lost race for a slot, is re-judged
            if snap.outcome is not None:
                self._after_outcome(snap.outcome, ctx)
                return
            if any(raw["event"] == ctx.event_id for raw in snap.ballots.values()):
                break  # a redelivery: the ballot is stored, finish what the crash cut short
            ballot, slot, policy = await self._judge(event, ctx, snap)
            now = now_ms()
            seq, snap = await state.add(
                key,
                ballot,
                slot=slot,
                policy=policy.params() if policy is not None else None,
                open_ms=now,
                close_ms=self._close_ms(event, now),
                expect=snap.version,
            )
            if seq in (STALE, SLOT_TAKEN):
                continue  # nothing stored; `snap` is the current state
            if seq == DONE:
                assert snap.outcome is not None
                self._after_outcome(snap.outcome, ctx)
                return
            mine[seq] = event
            if ballot["reason"] is not None:
                self.metrics.rejected.labels(ballot["reason"], ballot["replica"]).inc()
                log.warning(
                    "candidate rejected",
                    reason=ballot["reason"],
                    replica=ballot["replica"],
                    producer=ctx.envelope.producer,
                )
            break
        emissions = await self._evaluate(
            state,
            snap,
            trigger=ctx.event_id,
            producer=ctx.service,
            started=started,
            known=mine,
        )
        for e in emissions:
            ctx.publish(e.event, next_stage=e.next_stage, deadline_ms=e.deadline_ms)

    def _after_outcome(self, outcome: dict[str, Any], ctx: Context) -> None:
        if outcome["trigger"] == ctx.event_id:
            # The record that ended the vote, redelivered: its outputs may never have been
            # acknowledged.  Same events, same ids: consumers drop a copy they already have.
            for e in emissions_of(outcome):
                ctx.publish(e.event, next_stage=e.next_stage, deadline_ms=e.deadline_ms)
            return
        self.metrics.late.labels().inc()

    def _close_ms(self, event: CandidateAnswer, now: int) -> int:
        cfg = self.cfg
        window = event.route.consensus.timeout_ms or cfg.window_ms
        close = now + max(1, int(window))
        if event.deadline_ms is not None:
            close = min(close, event.deadline_ms - cfg.deadline_margin_ms)
        return max(close, now)

    async def _judge(
        self, event: CandidateAnswer, ctx: Context, snap: Snapshot
    ) -> tuple[dict[str, Any], int | None, VotePolicy | None]:
        """The ballot to store, the slot it claims, and the policy it would pin."""
        registry, equivalence = self._ready()
        producer = ctx.envelope.producer or ""
        reason: str | None = None
        try:
            own: VotePolicy | None = VotePolicy.from_slip(event.slip)
            if own is not None and own.mode is ConsensusMode.SINGLE and not self.cfg.accept_single:
                raise PolicyError("single mode is not accepted here")
        except PolicyError:
            own, reason = None, Reason.BAD_POLICY
        pinned = VotePolicy.from_params(snap.policy) if snap.policy else own
        if reason is None and own != pinned:
            reason = Reason.POLICY_MISMATCH
        if reason is None and pinned is not None:
            reason = registry.check(event, producer, pinned)
        slot = replica_slot(producer, registry.service)
        if pinned is None or slot not in pinned.slots:
            slot = None  # not one of the slip's replicas: never counted, spends nothing
        digest = event.digest()
        if slot is not None:
            first = next(
                (b for _, b in sorted(snap.ballots.items()) if b.get("slot") == slot), None
            )
            if first is not None:
                same = first["digest"] == digest
                reason = Reason.DUPLICATE_SIGNER if same else Reason.EQUIVOCATION
                slot = None  # the slot's first ballot stands
        klass: int | None = None
        if reason is None:
            reps = [
                (seq, key_of(b["answer"], b["structured"]))
                for seq, b in sorted(snap.ballots.items())
                if b.get("klass") == _FOUNDER and b.get("reason") is None
            ]
            found = await equivalence.assign(key_of(event.answer, event.structured), reps)
            klass = _FOUNDER if found is None else found
        ballot = {
            "slot": slot,
            "replica": event.replica_id if reason is None else producer or event.replica_id,
            "event": ctx.event_id,
            "digest": digest,
            "sig": base64.b64encode(event.signature).decode(),
            "model": f"{event.model}@{event.revision}",
            "klass": klass,
            "reason": reason,
            "answer": event.answer,
            "structured": event.structured,
            "candidate": event.model_dump_json(),
        }
        return ballot, slot, own if reason is None else None

    # -- ending a request -----------------------------------------------------------------

    async def _evaluate(
        self,
        state: ConsensusState,
        snap: Snapshot,
        *,
        trigger: str,
        producer: str,
        started: float | None = None,
        known: dict[int, CandidateAnswer] | None = None,
    ) -> list[Emission]:
        """The outcome's events when ``trigger`` ended the vote now; [] otherwise.
        ``known``: candidates in hand by seq (the trigger's own, not parsed back)."""
        if snap.policy is None:
            return []  # no valid ballot yet: only the window's end can settle it
        policy = VotePolicy.from_params(snap.policy)
        ballots = _ballots(snap)
        result = tally(policy, ballots)  # the ballots suffice: candidates only for an outcome
        if result.outcome is Outcome.PENDING:
            return []
        voted = _voted(snap, ballots, known)
        kind, emissions = self._outcome(
            policy, result, voted, snap, producer, window_closed=False, started=started
        )
        outcome = stored_outcome(trigger, kind, emissions)
        stored = await state.finalise(snap.key, outcome)
        if stored["trigger"] != trigger:
            return []
        self._count(policy, kind, snap)
        # Written now: these very events (what was stored is their JSON); else the stored.
        return emissions if stored is outcome else emissions_of(stored)

    def _outcome(
        self,
        policy: VotePolicy | None,
        result: Tally | None,
        voted: list[Voted],
        snap: Snapshot,
        producer: str,
        *,
        window_closed: bool,
        started: float | None = None,
    ) -> tuple[str, list[Emission]]:
        registry, _ = self._ready()
        latency = float(now_ms() - (snap.open_ms or now_ms()))
        # The deciding candidate's own handling (its ballot stored, the tally, the
        # decision built): what the vote adds once the last needed answer is in.
        decide_ms = (time.perf_counter() - started) * 1000.0 if started is not None else None
        if policy is not None and result is not None and result.winner is not None:
            _, emission = decision(
                policy=policy,
                result=result,
                klass=result.winner,
                voted=voted,
                registry=registry,
                producer=producer,
                versions=self.versions(),
                latency_ms=latency,
                decide_ms=decide_ms,
            )
            return DECIDED, [emission]
        if (
            window_closed
            and self.cfg.no_quorum == "plurality"
            and policy is not None
            and result is not None
            and result.classes
        ):
            order = result.largest()
            top = len(result.classes[order[0]])
            if len(order) == 1 or top > len(result.classes[order[1]]):
                _, emission = decision(
                    policy=policy,
                    result=result,
                    klass=order[0],
                    voted=voted,
                    registry=registry,
                    producer=producer,
                    versions=self.versions(),
                    latency_ms=latency,
                    fallback=True,
                )
                return FALLBACK, [emission]
        return ESCALATED, escalation(
            reason=self._why(policy, result, voted, window_closed),
            result=result,
            voted=voted,
            registry=registry,
            producer=producer,
            versions=self.versions(),
            with_result=self.cfg.escalation_result,
        )

    @staticmethod
    def _why(
        policy: VotePolicy | None, result: Tally | None, voted: list[Voted], window_closed: bool
    ) -> str:
        if policy is None or result is None:
            return "consensus: no valid candidate by the end of the collection window"
        sizes = sorted((len(b) for b in result.classes.values()), reverse=True)
        when = "by the end of the collection window" if window_closed else "possible any more"
        rejected = [f"{v.ballot.replica_id} {v.ballot.reason}" for v in voted if v.ballot.reason]
        text = (
            f"consensus: no quorum {when} ({policy.mode.value}, N={policy.replicas}, "
            f"f={policy.f}: {result.quorum} matching answers needed; classes {sizes or [0]}, "
            f"silent {len(result.silent)})"
        )
        return text + (f"; rejected: {', '.join(rejected)}" if rejected else "")

    def _count(self, policy: VotePolicy | None, kind: str, snap: Snapshot) -> None:
        mode = policy.mode.value if policy is not None else "unknown"
        self.metrics.outcomes.labels(mode, kind).inc()
        if snap.open_ms is not None:
            seconds = max(0.0, (now_ms() - snap.open_ms) / 1000)
            self.metrics.seconds.labels(mode, kind).observe(seconds)
        log.info("request settled", outcome=kind, mode=mode)

    # -- the window's end -----------------------------------------------------------------

    async def sweep(
        self, sink: Sink, *, producer: str, namespace: str = "", now: int | None = None
    ) -> int:
        """Settle every request whose window closed: returns how many were settled here."""
        state = self.state(namespace)
        now = now_ms() if now is None else now
        settled = 0
        for key in await state.due(now):
            if not await state.claim(key, self.owner, self.cfg.lease_ms):
                continue  # another instance is on it; its lease expires if it dies
            try:
                snap = await state.load(key)
                if snap.empty:
                    await state.settle(key)  # expired state: nothing left to decide
                    continue
                if snap.outcome is None:
                    policy = VotePolicy.from_params(snap.policy) if snap.policy else None
                    ballots = _ballots(snap)
                    voted = _voted(snap, ballots)
                    result = tally(policy, ballots) if policy else None
                    kind, emissions = self._outcome(
                        policy, result, voted, snap, producer, window_closed=True
                    )
                    stored = await state.finalise(
                        key, stored_outcome(TIMER, kind, emissions), settled=False
                    )
                    if stored["trigger"] == TIMER:
                        self._count(policy, kind, snap)
                else:
                    stored = snap.outcome
                if stored["trigger"] == TIMER:
                    await sink.send(emissions_of(stored))
                # A handler's outcome is its own record's to re-send: only the due entry left.
                await state.settle(key)
                settled += 1
            finally:
                await state.release(key, self.owner)
        return settled
