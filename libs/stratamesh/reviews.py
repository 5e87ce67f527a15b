"""Human review from the operator's side: what ``strata review ls|show|decide`` does.

Escalations live on ``reviews.pending`` (HumanReviewRequested: the reason, the question as
the models saw it — pseudonymised —, the retrieved context, every candidate, the guard
findings and the trace); decisions on ``reviews.decided`` (HumanReviewDecided, signed as
the ``console`` identity).  Both topics are the state: :func:`load_reviews` reads them
whole and pairs each escalation with its decision, if any.  :func:`decide` publishes a
decision; guard turns it into the request's final result (services/guard/review.py), and
the first decision of a review wins there, whatever this side believed.
"""

from __future__ import annotations

from dataclasses import dataclass

from aiokafka import TopicPartition

from stratamesh.bus.codec import Codec
from stratamesh.bus.offsets import iter_records, offset_bounds, open_consumer, topic_partitions
from stratamesh.bus.publish import Publisher
from stratamesh.bus.topics import REVIEWS_DECIDED, REVIEWS_PENDING
from stratamesh.config import Settings
from stratamesh.errors import ConfigError, StrataError
from stratamesh.events import (
    HumanReviewDecided,
    HumanReviewRequested,
    ReviewDecision,
)

__all__ = ["CONSOLE_IDENTITY", "Review", "decide", "find_review", "load_reviews"]

CONSOLE_IDENTITY = "console"


@dataclass(frozen=True, slots=True)
class Review:
    request: HumanReviewRequested
    decision: HumanReviewDecided | None

    @property
    def review_id(self) -> str:
        return self.request.event_id

    @property
    def pending(self) -> bool:
        return self.decision is None


async def _read(settings: Settings, topic_name: str) -> list[object]:
    codec = Codec.from_settings(settings)
    events: list[object] = []
    async with open_consumer(settings) as consumer:
        tps = [TopicPartition(topic_name, p) for p in await topic_partitions(consumer, topic_name)]
        bounds = await offset_bounds(consumer, tps)
        ranges = {tp: (b.begin, b.end) for tp, b in bounds.items()}
        async for _, records in iter_records(consumer, ranges):
            for rec in records:
                try:
                    events.append(codec.decode(rec.value or b""))
                except StrataError:
                    continue  # not an event of ours: the topic's consumers dead-letter it
    return events


async def load_reviews(settings: Settings) -> list[Review]:
    """Every escalation, oldest first, each with the first decision recorded for it."""
    pending = [
        e for e in await _read(settings, REVIEWS_PENDING) if isinstance(e, HumanReviewRequested)
    ]
    decisions = [
        e for e in await _read(settings, REVIEWS_DECIDED) if isinstance(e, HumanReviewDecided)
    ]
    decided: dict[str, HumanReviewDecided] = {}
    for d in sorted(decisions, key=lambda d: d.occurred_at):
        decided.setdefault(d.review_event_id, d)
    unique = {r.event_id: r for r in pending}  # redelivered escalations carry the same id
    return [
        Review(r, decided.get(r.event_id))
        for r in sorted(unique.values(), key=lambda r: r.occurred_at)
    ]


def find_review(reviews: list[Review], ref: str) -> Review:
    """The review whose id or request id is ``ref`` (a unique prefix of either will do)."""
    exact = [r for r in reviews if ref in (r.review_id, r.request.request_id)]
    hits = exact or [
        r for r in reviews if r.review_id.startswith(ref) or r.request.request_id.startswith(ref)
    ]
    if not hits:
        raise ConfigError(f"no review {ref!r}: `strata review ls` lists them")
    if len({r.review_id for r in hits}) > 1:
        raise ConfigError(f"{ref!r} names {len(hits)} reviews: give more of the id")
    return hits[-1]


async def decide(
    settings: Settings,
    review: Review,
    decision: ReviewDecision,
    *,
    reviewer: str,
    candidate: int = 1,
    answer: str | None = None,
    note: str | None = None,
) -> HumanReviewDecided:
    """Publish the decision on ``review`` (``candidate`` is 1-based, for ``approve``)."""
    if review.decision is not None:
        d = review.decision
        raise ConfigError(
            f"review {review.review_id} was already decided ({d.decision.value} by "
            f"{d.reviewer} at {d.occurred_at:%Y-%m-%d %H:%M})"
        )
    req = review.request
    citations = []
    if decision is ReviewDecision.APPROVE:
        if not 1 <= candidate <= len(req.candidates):
            raise ConfigError(
                f"review {review.review_id} has {len(req.candidates)} candidate(s); "
                f"--candidate must be 1..{len(req.candidates)}"
            )
        chosen = req.candidates[candidate - 1]
        answer, citations = chosen.answer, list(chosen.citations)
    elif decision is ReviewDecision.EDIT:
        if not (answer or "").strip():
            raise ConfigError("an edit needs the new answer: --answer TEXT")
    else:
        answer = None
    event = HumanReviewDecided.derive(
        req,
        # One id per (review, decision, reviewer): re-running the same command is a no-op.
        stage=f"review:{decision.value}:{reviewer}",
        producer=CONSOLE_IDENTITY,
        deadline_ms=None,  # the request's deadline passed long ago: a human decided anyway
        review_event_id=req.event_id,
        reviewer=reviewer,
        decision=decision,
        answer=answer,
        citations=citations,
        note=note,
    )
    async with Publisher(settings, CONSOLE_IDENTITY) as pub:
        await pub.publish(event, topic_name=REVIEWS_DECIDED)
    return event
