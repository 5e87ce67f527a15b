"""The route service: admitted requests → a routing slip, a cached answer, or a refusal.

    requests.admitted (RequestAdmitted, strata-next = route)
        ─► limits: tenant token bucket + shared pool by priority lane  ─► results (refusal)
        ─► exact cache ─► classify (one embedding) ─► semantic cache   ─► requests.routed
                                                                          [guard_out] + cache_hit
        ─► policy → slip; cost budget reservation                      ─► results (over_budget)
        ─► requests.routed (slip [retrieve?, infer, …, guard_out], strata-next = slip's first)
    results      (RequestCompleted)  ─► settle the budget reservation; fill the cache (ok)
    docs.indexed (ChunksIndexed)     ─► drop cached answers citing an older document version

Refusals are answers (``over_budget`` / ``overloaded`` with ``retry_after_ms``), never
errors.  Replayed events (``strata-replay``) neither consume nor settle budget, and neither
read nor fill the cache: a replay re-scores, it does not bill or short-circuit.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any, Final

import structlog

from stratamesh.bus.middleware import Context
from stratamesh.bus.service import Service
from stratamesh.bus.topics import DOCS_INDEXED, REQUESTS_ADMITTED, RESULTS, Stage
from stratamesh.config import Settings
from stratamesh.errors import ConfigError
from stratamesh.events import (
    Budget,
    CacheHit,
    ChunksIndexed,
    CompletionStatus,
    ConsensusMode,
    ConsensusPolicy,
    JudgePolicy,
    Priority,
    RequestAdmitted,
    RequestCompleted,
    RequestRouted,
    RetrievalPlan,
    RouteDecision,
    RoutingSlip,
    SlipStage,
    Tier,
)
from stratamesh.models.embedders import Vectors
from stratamesh.models.intent import Classification
from stratamesh.stores.redis import open_redis

from .cache import CacheHit as Hit
from .cache import ResponseCache, exact_digest, semantic_scope
from .classify import LazyIntentClassifier, RequestClassifier, request_text
from .limits import Lane, Limits, Refusal, effective_lane
from .metrics import route_metrics
from .policy import Decision, Policy, template_version

__all__ = ["SERVICE", "RouteService", "build_service", "service"]

log = structlog.get_logger("stratamesh.route")

SERVICE: Final = "route"
STAGE_LATENCY_KEY: Final = "route"
CLASSIFY_LATENCY_KEY: Final = "route_classify"


class RouteService(Service):
    """A :class:`Service` owning route's Redis client, policy and classifier."""

    def __init__(
        self,
        *,
        classifier: RequestClassifier | None = None,
        policy: Policy | None = None,
        identity: str | None = None,
        group: str | None = None,
        shadow: bool = False,
        batch_size: int = 32,
        batch_wait_ms: int = 5,
    ) -> None:
        super().__init__(SERVICE, identity=identity, group=group, shadow=shadow)
        self.classifier: RequestClassifier = classifier or LazyIntentClassifier()
        self._fixed_policy = policy
        self.policy: Policy | None = policy
        self.settings = Settings()
        self.limits: Limits | None = None
        self.cache: ResponseCache | None = None
        self._redis: Any = None
        self.subscribe(
            REQUESTS_ADMITTED, stage=Stage.ROUTE, batch_size=batch_size, batch_wait_ms=batch_wait_ms
        )(self.on_admitted)
        self.subscribe(RESULTS)(self.on_result)
        self.subscribe(DOCS_INDEXED)(self.on_indexed)
        # Hooks rather than overrides: variants (replicas, shadow) share them.
        self.on_bind(self.bind)
        self.on_start(self._warm)
        self.on_stop(self._close)

    # -- lifecycle ----------------------------------------------------------------------

    def bind(self, settings: Settings) -> None:
        """Adopt ``settings``: the policy (checked against the prompt registry) and a
        client of the operational Redis (no connection is made until first use)."""
        self.settings = settings
        cfg = settings.route
        policy = self._fixed_policy or Policy.from_settings(cfg)
        for name in {str(policy.defaults.get("template", "qa"))} | {
            str(r.then["template"]) for r in policy.rules if "template" in r.then
        }:
            try:
                template_version(name)
            except LookupError as exc:
                raise ConfigError(f"routing policy names unknown prompt template {name!r}") from exc
        self.policy = policy
        if self._redis is None:
            self._redis = open_redis(settings)
        self.limits = Limits(self._redis, cfg)
        self.cache = ResponseCache(
            self._redis,
            ttl_s=cfg.cache_ttl_s,
            threshold=cfg.semantic_cache_threshold,
            max_entries=cfg.semantic_cache_max_entries,
        )

    async def _warm(self, settings: Settings) -> None:
        warm = getattr(self.classifier, "warm", None)
        if warm is not None:
            await warm()  # load the model before taking partitions

    async def _close(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None
            self.limits = self.cache = None

    def _ready(self) -> tuple[Limits, ResponseCache, Policy]:
        if self.limits is None or self.cache is None or self.policy is None:
            raise ConfigError("route is not bound: call bind(), start() or build a pipeline")
        return self.limits, self.cache, self.policy

    # -- requests.admitted --------------------------------------------------------------

    async def on_admitted(self, items: list[tuple[RequestAdmitted, Context]]) -> None:
        limits, cache, policy = self._ready()
        cfg = self.settings.route
        started = time.perf_counter()
        lanes = [effective_lane(e.priority.value, ctx.tenant, cfg) for e, ctx in items]
        # Limits, then exact lookups: one Redis round trip each for the whole batch, in order.
        checks = iter(
            await limits.admit_many(
                [
                    (ctx.tenant, lane, e.request_id)
                    for (e, ctx), lane in zip(items, lanes, strict=True)
                    if not ctx.is_replay
                ]
            )
        )
        admitted: list[tuple[RequestAdmitted, Context, Lane, str]] = []
        for (event, ctx), lane in zip(items, lanes, strict=True):
            refusal = None if ctx.is_replay else next(checks)
            if refusal is not None:
                self._refuse(event, ctx, refusal, lane, started)
                continue
            admitted.append((event, ctx, lane, exact_digest(event.query.prompt, event.query)))

        use_cache = cfg.cache_enabled
        lookups = [(ctx.tenant, d) for _, ctx, _, d in admitted if use_cache and not ctx.is_replay]
        found = iter(await cache.get_exact_many(lookups))
        misses: list[tuple[RequestAdmitted, Context, Lane, str]] = []
        for event, ctx, lane, digest in admitted:
            hit = None
            if use_cache and not ctx.is_replay:
                hit = next(found)
                route_metrics().cache_lookups.labels("exact", "hit" if hit else "miss").inc()
            if hit is not None:
                self._serve_cached(event, ctx, lane, hit, None, started)
            else:
                misses.append((event, ctx, lane, digest))
        if not misses:
            return

        model_started = time.perf_counter()
        vectors, classes = await self.classifier.classify([request_text(e) for e, *_ in misses])
        model_ms = (time.perf_counter() - model_started) * 1000
        notes: list[tuple[str, str, str, str | None, Vectors | None, int | None]] = []
        for i, ((event, ctx, lane, digest), c) in enumerate(zip(misses, classes, strict=True)):
            scope = semantic_scope(event.query)
            if use_cache and scope is not None and not ctx.is_replay:
                hit = await cache.get_semantic(ctx.tenant, scope, vectors[i])
                route_metrics().cache_lookups.labels("semantic", "hit" if hit else "miss").inc()
                if hit is not None:
                    self._serve_cached(event, ctx, lane, hit, c, started)
                    continue
            remaining: float | None = None
            decision = policy.decide(
                c,
                task=event.query.task,
                lane=lane,
                settings=cfg,
                deployed_replicas=self.settings.infer.replicas,
            )
            if not ctx.is_replay:
                refusal, remaining = await limits.reserve(
                    ctx.tenant, event.request_id, decision.est_cost_usd
                )
                if refusal is not None:
                    self._refuse(event, ctx, refusal, lane, started)
                    continue
                if use_cache:
                    note = (ctx.tenant, event.request_id, digest, scope, vectors[i])
                    notes.append((*note, ctx.envelope.deadline_ms))
            if remaining is not None:
                budget = decision.budget.model_copy(update={"remaining_usd": remaining})
                decision = replace(decision, budget=budget)
            self._route(event, ctx, lane, c, decision, started, model_ms)
        await cache.remember_many(notes)

    def _latency(
        self, event: RequestAdmitted, started: float, model_ms: float | None = None
    ) -> dict[str, float]:
        latency = dict(event.stage_latency_ms)
        elapsed = (time.perf_counter() - started) * 1000
        latency[STAGE_LATENCY_KEY] = latency.get(STAGE_LATENCY_KEY, 0.0) + elapsed
        if model_ms is not None:
            # The classifier's share of "route" (one embedding call for the batch): model
            # time, not mesh overhead, for benchmarks that tell the two apart.
            latency[CLASSIFY_LATENCY_KEY] = model_ms
        return latency

    def _versions(self, event: RequestAdmitted, template: str) -> dict[str, str]:
        policy = self.policy
        return {
            **event.versions,
            "route_policy": policy.version if policy else "none",
            "intent_model": self.classifier.version,
            "template": template,
        }

    def _refuse(
        self,
        event: RequestAdmitted,
        ctx: Context,
        refusal: Refusal,
        lane: Lane,
        started: float,
    ) -> None:
        if refusal.kind == "shed":
            route_metrics().shed.labels(lane).inc()
        else:
            route_metrics().refused.labels(refusal.kind).inc()
        # debug: under overload this line would be written once per shed request.
        ctx.log.debug("request refused", status=refusal.status, kind=refusal.kind, lane=lane)
        ctx.publish(
            RequestCompleted.derive(
                event,
                stage=ctx.service,
                producer=ctx.service,
                tenant=ctx.tenant,
                priority=Priority(lane),
                stage_latency_ms=self._latency(event, started),
                status=CompletionStatus(refusal.status),
                reason=refusal.reason,
                retry_after_ms=max(1, refusal.retry_after_ms),
            )
        )

    def _serve_cached(
        self,
        event: RequestAdmitted,
        ctx: Context,
        lane: Lane,
        hit: Hit,
        c: Classification | None,
        started: float,
    ) -> None:
        policy = self.policy
        assert policy is not None
        template = template_version(str(policy.defaults.get("template", "qa")))
        slip = RoutingSlip(stages=[SlipStage(stage=Stage.GUARD_OUT)], current=0)
        entry = hit.entry
        routed = RequestRouted.derive(
            event,
            stage=ctx.service,
            producer=ctx.service,
            tenant=ctx.tenant,
            priority=Priority(lane),
            versions=self._versions(event, template),
            stage_latency_ms=self._latency(event, started),
            slip=slip,
            route=RouteDecision(
                tier=Tier.SMALL,
                model=entry.model or "cache",
                template_version=template,
                retrieval=RetrievalPlan(enabled=False),
                consensus=ConsensusPolicy(mode=ConsensusMode.SINGLE),
                judge=JudgePolicy(),
                budget=Budget(),
                classification=_scores(c),
            ),
            cache_hit=CacheHit(
                kind=hit.kind,
                similarity=hit.similarity,
                source_request_id=entry.source_request_id,
                answer=entry.answer,
                structured=entry.structured,
                citations=entry.citations,
            ),
        )
        ctx.publish(routed, next_stage=Stage.GUARD_OUT)
        ctx.log.debug("request served from cache", kind=hit.kind, lane=lane)

    def _route(
        self,
        event: RequestAdmitted,
        ctx: Context,
        lane: Lane,
        c: Classification,
        d: Decision,
        started: float,
        model_ms: float,
    ) -> None:
        for what in d.downgrades:
            route_metrics().downgrades.labels(
                what.split(":", 2)[0] + ":" + what.split(":", 2)[1]
            ).inc()
        route_metrics().routed.labels(d.tier.value, d.rule).inc()
        template = template_version(d.template)
        routed = RequestRouted.derive(
            event,
            stage=ctx.service,
            producer=ctx.service,
            tenant=ctx.tenant,
            priority=Priority(lane),
            versions=self._versions(event, template),
            stage_latency_ms=self._latency(event, started, model_ms),
            slip=d.slip,
            route=RouteDecision(
                tier=d.tier,
                model=d.model,
                adapter=d.adapter,
                template_version=template,
                retrieval=d.retrieval,
                consensus=d.consensus,
                judge=d.judge,
                budget=d.budget,
                classification=_scores(c),
            ),
            cache_hit=None,
        )
        ctx.log.debug("request routed", rule=d.rule, tier=d.tier.value, slip=_stages(d.slip))
        ctx.publish(routed, next_stage=d.slip.next_stage)

    # -- results ------------------------------------------------------------------------

    async def on_result(self, event: RequestCompleted, ctx: Context) -> None:
        if ctx.is_replay:
            return
        limits, cache, _ = self._ready()
        tenant = ctx.tenant
        await limits.settle(tenant, event.request_id, event.cost.cost_usd)
        if not self.settings.route.cache_enabled:
            return
        # Only full-quality answers are worth repeating: a degraded (reduced model,
        # extractive) answer is served once, not cached for the TTL.
        degraded = event.degradation not in (None, "full")
        if event.status != CompletionStatus.OK or event.cached or event.answer is None or degraded:
            if await cache.take_pending(tenant, event.request_id) is not None:
                route_metrics().cache_fills.labels("skipped").inc()
            return
        try:
            stored = await cache.fill(tenant, event)
        except ValueError:
            # A malformed pending record (never written by this code): not worth a DLQ.
            route_metrics().cache_fills.labels("skipped").inc()
            return
        route_metrics().cache_fills.labels("stored" if stored else "stale_or_not_pending").inc()

    # -- docs.indexed -------------------------------------------------------------------

    async def on_indexed(self, event: ChunksIndexed, ctx: Context) -> None:
        _, cache, _ = self._ready()
        dropped = await cache.invalidate(ctx.tenant, event.doc_id, event.doc_version)
        if dropped:
            route_metrics().invalidated.inc(dropped)
            log.info("cached answers invalidated", doc_version=event.doc_version, count=dropped)


def _scores(c: Classification | None) -> dict[str, float]:
    if c is None:
        return {}
    scores = c.scores()
    scores[f"intent:{c.intent}"] = round(c.intent_score, 4)
    scores[f"domain:{c.domain}"] = 1.0
    return scores


def _stages(slip: RoutingSlip) -> list[str]:
    return [s.stage for s in slip.stages]


def build_service(
    settings: Settings | None = None,
    *,
    classifier: RequestClassifier | None = None,
    policy: Policy | None = None,
    identity: str | None = None,
    group: str | None = None,
    shadow: bool = False,
) -> RouteService:
    """A route service.  Nothing is loaded or connected until it is bound or started."""
    cfg = (settings or Settings()).route
    svc = RouteService(
        classifier=classifier,
        policy=policy,
        identity=identity,
        group=group,
        shadow=shadow,
        batch_size=cfg.batch_size,
        batch_wait_ms=cfg.batch_wait_ms,
    )
    if settings is not None:
        svc.settings = settings
    return svc


service = build_service()
