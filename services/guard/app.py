"""The guard service: the first and the last stage of every request.

    requests.submitted   (InferenceRequested)           ─► requests.admitted (RequestAdmitted,
                                                            strata-next = route)
                                                         or results (RequestCompleted blocked)
    inference.completed  (CandidateAnswer)   ┐
    requests.decided     (AnswerDecided)     │ strata-next
    requests.judged      (AnswerJudged)      │ = guard_out ─► results (RequestCompleted)
    requests.routed      (RequestRouted, cache hit)      ┘    (+ reviews.pending on escalation)
    reviews.decided      (HumanReviewDecided)            ─► results (the reviewed request's
                                                            final RequestCompleted)

Input stage: :mod:`.admission`; output stage: :mod:`.release`; review decisions:
:mod:`.review`.  They use the components of :mod:`.components` (policy, injection
classifier, PII pseudonymiser over the operational Redis, canary minter, review ledger),
bound from settings when the pipeline is built.

Deadlines: a request whose ``strata-deadline`` passed before a handler runs gets its
``expired`` result from the bus middleware (never silence); review decisions carry no
deadline — a human may take days.
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
    REVIEWS_DECIDED,
    REVIEWS_PENDING,
    Stage,
)
from stratamesh.config import Settings
from stratamesh.errors import Poison
from stratamesh.events import HumanReviewDecided, InferenceRequested
from stratamesh.security.pseudonym import MappingStore

from .admission import admit
from .components import Guard
from .release import Source, draft_of, release
from .review import complete

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

    @svc.subscribe(REVIEWS_DECIDED)
    async def on_review_decided(event: HumanReviewDecided, ctx: Context) -> None:
        tenant = ctx.tenant
        if not tenant:
            raise Poison("HumanReviewDecided without a tenant")
        if event.decision.value in ("approve", "edit") and not (event.answer or "").strip():
            raise Poison(f"a review decision {event.decision.value!r} without an answer")
        result = await complete(guard.get(), event, tenant=tenant, producer=ctx.service)
        if result is not None:
            ctx.publish(result)

    return svc


service = build_service()
