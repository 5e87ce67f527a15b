"""guard's output stage: the last stop of every slip, the only way to ``results``.

Input: a single-replica ``CandidateAnswer``, an ``AnswerDecided``, an ``AnswerJudged``, or a
``RequestRouted`` carrying route's cache hit.  Checks, in order:

1. canary — the request's canary (recomputed from the guard secret, and the copy carried in
   ``Query.canary``) appears in the answer → blocked;
2. unsafe content (:mod:`.unsafe`) → blocked at ``unsafe_threshold``, human review at the
   tenant's ``escalate.unsafe_score``;
3. citations — every ``[n]`` must name a passage of the retrieved context and every cited
   chunk must have been retrieved; invented ones are flagged, stripped or block the answer per
   tenant policy; an answer over retrieved context without any citation is flagged; the
   released answer's markers are renumbered to index its own citation list;
4. PII in the answer → pseudonymised (consistently with the input stage); re-identified only
   when the tenant policy says ``reidentify_answers``;
5. judge scores past the tenant's hard thresholds → human review.

Escalations publish ``HumanReviewRequested`` (reviews.pending) and the result names it in
``review_event_id`` with status ``escalated`` (or ``blocked`` when a block also applies);
the answer is withheld from a result that is not ``ok``.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Final

import structlog

from stratamesh.citations import MARKER, cited_numbers, marker_numbers, marker_parts
from stratamesh.events import (
    AnswerDecided,
    AnswerJudged,
    CandidateAnswer,
    Citation,
    CompletionStatus,
    Cost,
    GuardFinding,
    GuardVerdict,
    HumanReviewRequested,
    Query,
    RequestCompleted,
    RequestRouted,
    ReviewCandidate,
    RoutingSlip,
)

from .components import Ready
from .metrics import guard_metrics
from .pii import detect
from .policy import TenantPolicy
from .unsafe import unsafe_score

__all__ = [
    "STAGE_LATENCY_KEY",
    "Draft",
    "Findings",
    "Release",
    "citation_check",
    "draft_of",
    "protect_pii",
    "release",
    "renumber",
]

log = structlog.get_logger("stratamesh.guard")

STAGE_LATENCY_KEY = "guard_out"
STAGE = "guard_out"

Source = CandidateAnswer | AnswerDecided | AnswerJudged | RequestRouted

_EXPIRED: Final = "expired"  # CandidateAnswer.degradation when the deadline beat every tier


@dataclass(frozen=True, slots=True)
class Draft:
    """What any of the four input events says about the answer."""

    answer: str
    structured: str | None
    citations: list[Citation]
    context: list[Citation] | None  # None: not known (the input does not carry it)
    query: Query
    slip: RoutingSlip
    model: str | None
    cost: Cost
    scores: dict[str, float] = field(default_factory=dict)
    degradation: str | None = None
    cached: bool = False
    judge: AnswerJudged | None = None


def draft_of(event: Source) -> Draft | None:
    """The draft answer of ``event``; None for a RequestRouted that is not a cache hit."""
    if isinstance(event, RequestRouted):
        hit = event.cache_hit
        if hit is None:
            return None
        return Draft(
            answer=hit.answer,
            structured=hit.structured,
            citations=list(hit.citations),
            context=list(hit.citations),
            query=event.query,
            slip=event.slip,
            model=None,
            cost=Cost(),
            scores={"cache_similarity": float(hit.similarity)},
            degradation=event.versions.get("degradation"),
            cached=True,
        )
    if isinstance(event, CandidateAnswer):
        model = (
            event.model
            if "@" in event.model or not event.revision
            else (f"{event.model}@{event.revision}")
        )
        return Draft(
            answer=event.answer,
            structured=event.structured,
            citations=list(event.citations),
            context=list(event.context),
            query=event.query,
            slip=event.slip,
            model=model,
            cost=event.cost,
            degradation=event.degradation,
        )
    scores: dict[str, float] = {}
    if isinstance(event, AnswerDecided):
        scores = {"votes_for": float(event.votes_for), "votes_total": float(event.votes_total)}
    else:
        scores = {
            "faithfulness": float(event.faithfulness),
            "relevance": float(event.relevance),
            "citation_score": float(event.citation_score),
            **{f"rubric_{k}": float(v) for k, v in event.rubric.items()},
        }
    return Draft(
        answer=event.answer,
        structured=event.structured,
        citations=list(event.citations),
        context=list(event.context),
        query=event.query,
        slip=event.slip,
        model=event.model,
        cost=event.cost,
        scores=scores,
        degradation=event.versions.get("degradation"),
        judge=event if isinstance(event, AnswerJudged) else None,
    )


@dataclass(frozen=True, slots=True)
class CitationCheck:
    markers: int  # [n] references in the answer
    invalid_markers: list[int]
    invalid_chunks: list[str]  # cited chunk ids that were not retrieved
    score: float  # share of valid references (1.0 when nothing is cited)


def citation_check(
    answer: str, citations: list[Citation], context: list[Citation]
) -> CitationCheck:
    """Every ``[n]`` must be a 1-based passage number of ``context``; every cited chunk must
    be one of the context's chunks."""
    numbers = cited_numbers(answer)
    bad = sorted({n for n in numbers if not 1 <= n <= len(context)})
    retrieved = {c.chunk_id for c in context}
    bad_chunks = sorted({c.chunk_id for c in citations if c.chunk_id not in retrieved})
    refs = len(numbers) + len(citations)
    invalid = sum(1 for n in numbers if n in bad) + sum(
        1 for c in citations if c.chunk_id in bad_chunks
    )
    score = 1.0 if refs == 0 else (refs - invalid) / refs
    return CitationCheck(len(numbers), bad, bad_chunks, score)


def renumber(
    answer: str, context: list[Citation], citations: list[Citation]
) -> tuple[str, list[Citation]]:
    """Passage numbers of the prompt become positions in the citation list, so the released
    answer's ``[k]`` is its own k-th citation whatever order the model saw the passages in.

    A passage the answer cites but ``citations`` lacks is appended to it; a number that names
    no passage of ``context`` is left as it is (the citation check has dealt with it).
    """
    cited = list(citations)
    position = {c.chunk_id: k for k, c in enumerate(cited, start=1)}

    def label(n: int) -> str:
        if not 1 <= n <= len(context):
            return str(n)
        chunk = context[n - 1]
        if chunk.chunk_id not in position:
            cited.append(chunk)
            position[chunk.chunk_id] = len(cited)
        return str(position[chunk.chunk_id])

    def repl(m: re.Match[str]) -> str:
        labels: list[str] = []
        for n in marker_numbers(m.group(1)):
            if (x := label(n)) not in labels:
                labels.append(x)
        return f"[{', '.join(labels)}]"

    return MARKER.sub(repl, answer), cited


def _strip_markers(answer: str, bad: set[int]) -> str:
    def repl(m: re.Match[str]) -> str:
        good = [p for p in marker_parts(m.group(1)) if not set(marker_numbers(p)) & bad]
        return f"[{', '.join(good)}]" if good else ""

    # A space left before punctuation by a removed marker goes too.
    return re.sub(r" +([.,;:!?])", r"\1", MARKER.sub(repl, answer))


@dataclass(frozen=True, slots=True)
class Release:
    result: RequestCompleted
    review: HumanReviewRequested | None


def _expired(
    g: Ready, event: Source, draft: Draft, *, tenant: str, producer: str, started: float
) -> RequestCompleted:
    """infer gave up at the deadline: an explicit ``expired`` result, never silence."""
    latency = dict(event.stage_latency_ms)
    latency[STAGE_LATENCY_KEY] = (time.perf_counter() - started) * 1000.0
    guard_metrics().results.labels(STAGE, CompletionStatus.EXPIRED.value).inc()
    return RequestCompleted.derive(
        event,
        stage=producer,
        producer=producer,
        tenant=tenant,
        slip=draft.slip.advanced(),
        status=CompletionStatus.EXPIRED,
        answer=None,
        structured=None,
        citations=[],
        reason="deadline passed before any model tier answered",
        model=draft.model,
        findings=[],
        cost=draft.cost,
        stage_latency_ms=latency,
        versions={**event.versions, **g.versions(), "degradation": _EXPIRED},
    )


class Findings:
    def __init__(self, g: Ready) -> None:
        self.g = g
        self.items: list[GuardFinding] = []
        self.block: list[str] = []
        self.escalate: list[str] = []

    def add(
        self,
        scanner: str,
        score: float,
        threshold: float,
        verdict: GuardVerdict,
        category: str | None = None,
    ) -> None:
        self.items.append(
            GuardFinding(
                scanner=scanner,
                score=round(float(score), 4),
                threshold=float(threshold),
                verdict=verdict,
                guard_version=self.g.version,
                category=category,
            )
        )
        guard_metrics().verdicts.labels(STAGE, scanner, verdict.value).inc()


async def protect_pii(
    g: Ready, f: Findings, policy: TenantPolicy, tenant: str, answer: str, structured: str | None
) -> tuple[str, str | None, int, int]:
    """PII in an answer pseudonymised (consistently with the input stage), then
    re-identified only where the tenant allows: (answer, structured, found, re-identified)."""
    min_score = g.settings.pii_min_score
    texts = [answer] + ([structured] if structured else [])
    spans = [detect(t, min_score=min_score) for t in texts]
    done = await g.pseudonymiser.pseudonymise(tenant, texts, spans)
    answer = done[0].text
    if structured:
        structured = done[1].text
    pii_count = sum(d.count for d in done)
    if pii_count:
        cats = sorted({c for d in done for c in d.categories})
        f.add("pii", 1.0, min_score, GuardVerdict.REDACT, ",".join(cats))
        for d in done:
            for cat, n in d.categories.items():
                guard_metrics().pii.labels(STAGE, cat).inc(n)
    reidentified = 0
    if policy.reidentify_answers:
        answer, n1 = await g.pseudonymiser.reidentify(tenant, answer)
        reidentified += n1
        if structured:
            structured, n2 = await g.pseudonymiser.reidentify(tenant, structured)
            reidentified += n2
    return answer, structured, pii_count, reidentified


async def release(g: Ready, event: Source, draft: Draft, *, tenant: str, producer: str) -> Release:
    started = time.perf_counter()
    if draft.degradation == _EXPIRED:
        return Release(
            _expired(g, event, draft, tenant=tenant, producer=producer, started=started), None
        )
    policy: TenantPolicy = g.policy.for_tenant(tenant)
    f = Findings(g)
    answer, structured, citations = draft.answer, draft.structured, list(draft.citations)
    full_text = answer + ("\n" + structured if structured else "")

    # 1. canary
    canaries = {g.canary.mint(event.request_id)}
    if draft.query.canary:
        canaries.add(draft.query.canary)
    leaked = any(g.canary.leaked(c, full_text) for c in canaries)
    f.add(
        "canary", 1.0 if leaked else 0.0, 1.0, GuardVerdict.BLOCK if leaked else GuardVerdict.PASS
    )
    if leaked:
        f.block.append("the answer discloses the request's canary (prompt leak)")

    # 2. unsafe content
    unsafe = unsafe_score(full_text)
    limit = g.settings.unsafe_threshold
    is_unsafe = unsafe.score >= limit
    f.add(
        "unsafe_content",
        unsafe.score,
        limit,
        GuardVerdict.BLOCK if is_unsafe else GuardVerdict.PASS,
        ",".join(unsafe.categories) or None,
    )
    if is_unsafe:
        f.block.append(f"unsafe content ({', '.join(unsafe.categories)})")
    if unsafe.score >= policy.escalate.unsafe_score:
        f.escalate.append(f"unsafe content score {unsafe.score:.2f}")

    # 3. citations
    cite_score = 1.0
    if draft.context is not None:
        check = citation_check(answer, citations, draft.context)
        cite_score = check.score
        if check.invalid_markers or check.invalid_chunks:
            action = policy.citations
            verdict = {"flag": GuardVerdict.FLAG, "strip": GuardVerdict.REDACT}.get(
                action, GuardVerdict.BLOCK
            )
            f.add("citations", 1.0 - check.score, 0.0, verdict, "invented")
            if action == "block":
                f.block.append("the answer cites passages that were not retrieved")
            elif action == "strip":
                answer = _strip_markers(answer, set(check.invalid_markers))
                citations = [c for c in citations if c.chunk_id not in check.invalid_chunks]
            if check.score < policy.escalate.citation_score_below:
                f.escalate.append(f"citation score {check.score:.2f}")
        elif draft.context and check.markers == 0 and not citations:
            f.add("citations", 1.0, 0.0, GuardVerdict.FLAG, "missing")
        else:
            f.add("citations", 0.0, 0.0, GuardVerdict.PASS)
        answer, citations = renumber(answer, draft.context, citations)

    # 4. PII in the answer
    answer, structured, pii_count, reidentified = await protect_pii(
        g, f, policy, tenant, answer, structured
    )

    # 5. judge thresholds
    if draft.judge is not None:
        j = draft.judge
        if j.faithfulness < policy.escalate.faithfulness_below:
            f.add(
                "judge",
                1.0 - j.faithfulness,
                1.0 - policy.escalate.faithfulness_below,
                GuardVerdict.FLAG,
                "faithfulness",
            )
            f.escalate.append(f"faithfulness {j.faithfulness:.2f}")
        elif not j.passed:
            f.add("judge", 1.0 - j.faithfulness, 0.0, GuardVerdict.FLAG, "below_threshold")

    scores = dict(draft.scores)
    scores.update(
        {
            "guard_unsafe": unsafe.score,
            "guard_citations": cite_score,
            "guard_pii": float(pii_count),
            "guard_reidentified": float(reidentified),
        }
    )
    status = CompletionStatus.OK
    reason: str | None = None
    if f.block:
        status, reason = CompletionStatus.BLOCKED, "; ".join(f.block)
    elif f.escalate:
        status, reason = CompletionStatus.ESCALATED, "human review: " + "; ".join(f.escalate)

    versions = {**event.versions, **g.versions()}
    if draft.degradation:
        versions["degradation"] = draft.degradation
    review: HumanReviewRequested | None = None
    if f.escalate:
        review = HumanReviewRequested.derive(
            event,
            stage=producer,
            producer=producer,
            index=1,
            tenant=tenant,
            slip=draft.slip,
            reason="; ".join(f.escalate + f.block),
            query=draft.query,
            context=list(draft.context or []),
            candidates=[
                ReviewCandidate(
                    answer=answer,
                    model=draft.model,
                    structured=structured,
                    citations=citations,
                    scores=scores,
                )
            ],
            findings=f.items,
            cost=draft.cost,
            versions=versions,
        )
    latency = dict(event.stage_latency_ms)
    latency[STAGE_LATENCY_KEY] = (time.perf_counter() - started) * 1000.0
    ok = status is CompletionStatus.OK
    result = RequestCompleted.derive(
        event,
        stage=producer,
        producer=producer,
        tenant=tenant,
        slip=draft.slip.advanced(),
        status=status,
        answer=answer if ok else None,
        structured=structured if ok else None,
        citations=citations if ok else [],
        scores=scores,
        reason=reason,
        retry_after_ms=None,
        model=draft.model,
        findings=f.items,
        cached=draft.cached,
        degradation=draft.degradation,
        review_event_id=review.event_id if review is not None else None,
        cost=draft.cost,
        stage_latency_ms=latency,
        versions=versions,
    )
    guard_metrics().results.labels(STAGE, status.value).inc()
    log.info(
        "answer released",
        status=status.value,
        pii=pii_count,
        escalated=review is not None,
        degradation=draft.degradation,
    )
    return Release(result, review)
