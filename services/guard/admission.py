"""guard's input stage: ``InferenceRequested`` → ``RequestAdmitted`` or a blocked result.

Order matters: cheap policy checks first (size, allowed task), then injection scoring on the
raw text (in this process only), then PII detection and pseudonymisation — the admitted event
carries no raw PII, and neither do logs (only counts and categories) nor metric labels.  A
canary token is minted for the request and carried in ``Query.canary``.  Every scanner's
verdict is a :class:`GuardFinding` (scanner, score, threshold, guard version).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import structlog

from stratamesh.events import (
    CompletionStatus,
    GuardFinding,
    GuardVerdict,
    InferenceRequested,
    Message,
    Query,
    RequestAdmitted,
    RequestCompleted,
)
from stratamesh.security.pseudonym import Span

from .components import Ready
from .metrics import guard_metrics
from .pii import detect

__all__ = ["STAGE_LATENCY_KEY", "Decision", "admit"]

log = structlog.get_logger("stratamesh.guard")

STAGE_LATENCY_KEY = "guard_in"
STAGE = "guard_in"


@dataclass(frozen=True, slots=True)
class Decision:
    """The one event the input stage publishes for a request."""

    event: RequestAdmitted | RequestCompleted

    @property
    def admitted(self) -> bool:
        return isinstance(self.event, RequestAdmitted)


def _finding(
    g: Ready,
    scanner: str,
    score: float,
    threshold: float,
    verdict: GuardVerdict,
    category: str | None,
) -> GuardFinding:
    return GuardFinding(
        scanner=scanner,
        score=round(float(score), 4),
        threshold=float(threshold),
        verdict=verdict,
        guard_version=g.version,
        category=category,
    )


async def _blocked(
    g: Ready,
    event: InferenceRequested,
    *,
    tenant: str,
    producer: str,
    reason: str,
    findings: list[GuardFinding],
    started: float,
) -> Decision:
    latency = dict(event.stage_latency_ms)
    latency[STAGE_LATENCY_KEY] = (time.perf_counter() - started) * 1000.0
    guard_metrics().results.labels(STAGE, "blocked").inc()
    return Decision(
        RequestCompleted.derive(
            event,
            stage=producer,
            producer=producer,
            tenant=tenant,
            status=CompletionStatus.BLOCKED,
            reason=reason,
            findings=findings,
            stage_latency_ms=latency,
            versions={**event.versions, **g.versions()},
            client_metadata=await _metadata(g, event, tenant),
        )
    )


async def _metadata(g: Ready, event: InferenceRequested, tenant: str) -> dict[str, str]:
    """The client's metadata, pseudonymised: it is echoed in the result."""
    keys = sorted(event.client_metadata)
    values = [event.client_metadata[k] for k in keys]
    spans = [detect(v, min_score=g.settings.pii_min_score) for v in values]
    if not any(spans):
        return dict(event.client_metadata)
    done = await g.pseudonymiser.pseudonymise(tenant, values, spans)
    return {k: d.text for k, d in zip(keys, done, strict=True)}


async def admit(g: Ready, event: InferenceRequested, *, tenant: str, producer: str) -> Decision:
    """Decide one request.  ``tenant`` is the authenticated one (``ctx.tenant``)."""
    started = time.perf_counter()
    m = guard_metrics()
    violations = g.policy.check(event, tenant)
    if violations:
        findings = [_finding(g, "policy", 1.0, 1.0, GuardVerdict.BLOCK, v.code) for v in violations]
        m.verdicts.labels(STAGE, "policy", "block").inc(len(violations))
        log.info("request blocked by policy", codes=[v.code for v in violations])
        reason = "policy: " + "; ".join(v.reason for v in violations)
        return await _blocked(
            g,
            event,
            tenant=tenant,
            producer=producer,
            reason=reason,
            findings=findings,
            started=started,
        )

    texts = [event.prompt, *(msg.content for msg in event.messages)]
    inj = g.injection.score(texts)
    threshold = g.injection_threshold
    m.injection_score.labels().observe(inj.score)
    injected = inj.score >= threshold
    inj_finding = _finding(
        g,
        "prompt_injection",
        inj.score,
        threshold,
        GuardVerdict.BLOCK if injected else GuardVerdict.PASS,
        ",".join(inj.rules) or ("classifier" if injected else None),
    )
    m.verdicts.labels(STAGE, "prompt_injection", inj_finding.verdict.value).inc()
    if injected:
        log.info("request blocked: prompt injection", score=round(inj.score, 3), rules=inj.rules)
        rules = f"; rules: {', '.join(inj.rules)}" if inj.rules else ""
        reason = (
            f"prompt injection detected (score {inj.score:.2f} ≥ {threshold:.2f}, "
            f"classifier {g.injection.version} {inj.classifier:.2f}{rules})"
        )
        return await _blocked(
            g,
            event,
            tenant=tenant,
            producer=producer,
            reason=reason,
            findings=[inj_finding],
            started=started,
        )

    # PII: every free-text field a client controls, in one store round trip.
    meta_keys = sorted(event.client_metadata)
    fields = texts + [event.client_metadata[k] for k in meta_keys]
    min_score = g.settings.pii_min_score
    spans: list[list[Span]] = [detect(t, min_score=min_score) for t in fields]
    done = await g.pseudonymiser.pseudonymise(tenant, fields, spans)
    prompt, *rest = [d.text for d in done]
    message_texts, meta_values = rest[: len(event.messages)], rest[len(event.messages) :]
    count = sum(d.count for d in done)
    categories: dict[str, int] = {}
    best: dict[str, float] = {}
    for d, sp in zip(done, spans, strict=True):
        for cat, n in d.categories.items():
            categories[cat] = categories.get(cat, 0) + n
        for s in sp:
            best[s.entity_type] = max(best.get(s.entity_type, 0.0), s.score)
    findings = [inj_finding]
    for cat in sorted(categories):
        findings.append(_finding(g, "pii", best.get(cat, 1.0), min_score, GuardVerdict.REDACT, cat))
        m.pii.labels(STAGE, cat).inc(categories[cat])
        m.verdicts.labels(STAGE, "pii", "redact").inc()

    query = Query(
        prompt=prompt,
        task=event.task,
        messages=[
            Message(role=msg.role, content=text)
            for msg, text in zip(event.messages, message_texts, strict=True)
        ],
        response_format=event.response_format,
        max_tokens=event.max_tokens,
        temperature=event.temperature,
        principals=list(event.principals),
        as_of=event.as_of,
        canary=g.canary.mint(event.request_id),
    )
    latency = dict(event.stage_latency_ms)
    latency[STAGE_LATENCY_KEY] = (time.perf_counter() - started) * 1000.0
    m.results.labels(STAGE, "admitted").inc()
    log.info("request admitted", pseudonyms=count, categories=categories)
    return Decision(
        RequestAdmitted.derive(
            event,
            stage=producer,
            producer=producer,
            tenant=tenant,
            query=query,
            findings=findings,
            guard_version=g.version,
            pseudonym_count=count,
            stage_latency_ms=latency,
            versions={**event.versions, **g.versions()},
            client_metadata=dict(zip(meta_keys, meta_values, strict=True)),
        )
    )
