"""Human review decisions: how an escalated request completes (reviews.decided → results).

An escalation (guard's output thresholds, or consensus without a quorum) publishes
``HumanReviewRequested`` on reviews.pending and an ``escalated`` result naming it.  A reviewer
(``strata review decide``, signed as ``console``; the topic accepts no other producer)
answers with ``HumanReviewDecided``; guard, the only way to ``results``, turns it into the
request's final result:

* ``approve`` / ``edit`` → ``ok`` with the reviewer's answer (an approved candidate's text
  or the edited one).  It still passes the PII step of the output stage: pseudonymised, then
  re-identified only where the tenant allows — the reviewer saw pseudonyms, and an edit may
  add personal data.  The other output checks are not re-run: a human decided.
* ``reject`` → ``blocked``, reason ``rejected in human review`` (+ the reviewer's note).

One decision per review: the first one guard sees wins (``SET NX`` under
:data:`~stratamesh.stores.keys.GUARD_REVIEWED` in the operational Redis); a later, different
decision for the same review is dropped and counted — two reviewers racing never produce
two final results.  ``versions["review"]`` records ``<decision>:<reviewer>``.
"""

from __future__ import annotations

import time
from typing import Final

from stratamesh.events import (
    CompletionStatus,
    HumanReviewDecided,
    RequestCompleted,
    ReviewDecision,
)

from .components import Ready
from .metrics import guard_metrics
from .release import Findings, protect_pii

__all__ = ["STAGE_LATENCY_KEY", "complete"]

STAGE_LATENCY_KEY: Final = "guard_review"


async def complete(
    g: Ready, event: HumanReviewDecided, *, tenant: str, producer: str
) -> RequestCompleted | None:
    """The final result of a reviewed request, or None for a review already decided."""
    started = time.perf_counter()
    if not await g.reviews.first(tenant, event.review_event_id, event.event_id):
        guard_metrics().results.labels("review", "duplicate_decision").inc()
        return None
    policy = g.policy.for_tenant(tenant)
    f = Findings(g)
    approved = event.decision in (ReviewDecision.APPROVE, ReviewDecision.EDIT)
    answer: str | None = None
    pii = reidentified = 0
    if approved:
        answer, _, pii, reidentified = await protect_pii(
            g, f, policy, tenant, event.answer or "", None
        )
        status, reason = CompletionStatus.OK, None
    else:
        status = CompletionStatus.BLOCKED
        reason = "rejected in human review" + (f": {event.note}" if event.note else "")
    latency = dict(event.stage_latency_ms)
    latency[STAGE_LATENCY_KEY] = (time.perf_counter() - started) * 1000.0
    guard_metrics().results.labels("review", status.value).inc()
    return RequestCompleted.derive(
        event,
        stage=producer,
        producer=producer,
        tenant=tenant,
        slip=event.slip,
        status=status,
        answer=answer,
        structured=None,
        citations=list(event.citations) if approved else [],
        scores={"guard_pii": float(pii), "guard_reidentified": float(reidentified)},
        reason=reason,
        retry_after_ms=None,
        findings=f.items,
        review_event_id=event.review_event_id,
        stage_latency_ms=latency,
        versions={
            **event.versions,
            **g.versions(),
            "review": f"{event.decision.value}:{event.reviewer}",
        },
    )
