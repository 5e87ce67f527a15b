"""The guard service: the first and the last stage of every request.

    requests.submitted   (InferenceRequested)           ─► requests.admitted (RequestAdmitted,
                                                            strata-next = route)
                                                         or results (RequestCompleted blocked)
    inference.completed  (CandidateAnswer)   ┐
    requests.decided     (AnswerDecided)     │ strata-next
    requests.judged      (AnswerJudged)      │ = guard_out ─► results (RequestCompleted)
    requests.routed      (RequestRouted, cache hit)      ┘    (+ reviews.pending on escalation)

Input stage: :mod:`.admission`; output stage: :mod:`.release`.  Both use the components of
:mod:`.components` (policy, injection classifier, PII pseudonymiser over the operational
Redis, canary minter), bound from settings when the pipeline is built.

Deadlines: the middleware dead-letters a record whose ``strata-deadline`` passed before its
handler runs, so an expired request reaches neither stage and gets no ``results`` event from
guard (see the report of issue 4: the middleware needs an "expired" hook for that).
"""

from __future__ import annotations

from stratamesh.bus.middleware import Context
from stratamesh.bus.service import Service
from stratamesh.bus.topics import (
    INFERENCE_COMPLETED,
    REQUESTS_DECIDED,
    REQUESTS_JUDGED,
    REQUESTS_ROUTED,
    REQUESTS_SUBMITTED,
    REVIEWS_PENDING,
    Stage,
)
from stratamesh.config import Settings
from stratamesh.errors import Poison
from stratamesh.events import InferenceRequested
from stratamesh.security.pseudonym import MappingStore

from .admission import admit
from .components import Guard
from .release import Source, draft_of, release

__all__ = ["GuardService", "build_service", "service"]


class GuardService(Service):
    """A :class:`Service` that keeps its :class:`Guard` reachable (tests, tools)."""

    def __init__(
        self, guard: Guard, *, identity: str | None = None, group: str | None = None
    ) -> None:
        super().__init__("guard", identity=identity, group=group)
        self.guard = guard


def build_service(store: MappingStore | None = None) -> GuardService:
    """The guard service; ``store`` replaces the Redis pseudonym mapping (unit tests)."""
    guard = Guard(store=store)
    svc = GuardService(guard)

    @svc.on_bind
    def bind(settings: Settings) -> None:
        guard.bind(settings)

    @svc.on_stop
    async def close() -> None:
        await guard.close()

    # No stage filter: guard_in is the only reader of ingress, and a client's stray
    # strata-next header must not make a request vanish unanswered.
    @svc.subscribe(REQUESTS_SUBMITTED)
    async def on_submitted(event: InferenceRequested, ctx: Context) -> None:
        tenant = ctx.tenant
        if not tenant:
            raise Poison("InferenceRequested without an authenticated tenant")
        decision = await admit(guard.get(), event, tenant=tenant, producer=ctx.service)
        if decision.admitted:
            ctx.publish(decision.event, next_stage=Stage.ROUTE)
        else:
            ctx.publish(decision.event)

    async def on_answer(event: Source, ctx: Context) -> None:
        tenant = ctx.tenant
        if not tenant:
            raise Poison(f"{event.EVENT_TYPE} without an authenticated tenant")
        draft = draft_of(event)
        if draft is None:
            # A routed request addressed to guard_out without a cache hit: route's invariant
            # broken.  Poison, so it is visible in the DLQ rather than silently answered.
            raise Poison("RequestRouted addressed to guard_out without a cache hit")
        out = await release(guard.get(), event, draft, tenant=tenant, producer=ctx.service)
        if out.review is not None:
            ctx.publish(out.review, topic_name=svc.namespace + REVIEWS_PENDING)
        ctx.publish(out.result)

    for topic_name in (INFERENCE_COMPLETED, REQUESTS_DECIDED, REQUESTS_JUDGED, REQUESTS_ROUTED):
        svc.subscribe(topic_name, stage=Stage.GUARD_OUT)(on_answer)
    return svc


service = build_service()
