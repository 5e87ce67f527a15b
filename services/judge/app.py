"""The judge service: scores an answer, sends it on, or back to infer once with a critique.

    requests.decided    (AnswerDecided,   strata-next = judge) ─┐
    inference.completed (CandidateAnswer, strata-next = judge) ─┴─► requests.judged
        (AnswerJudged: strata-next = the slip's next stage — guard_out —, or, below the
         thresholds with revision rounds left, infer with the critique: :mod:`.revision`)

Scores (DESIGN.md §4): faithfulness, citation existence and correctness, relevance
(:mod:`.faithfulness`), format compliance (:mod:`.formats`) and the LLM-as-judge rubric
(:mod:`.rubric`, only with a judge model of another family; otherwise skipped and
``versions["judge.rubric"]`` says why).  ``passed`` = every score at or above its
threshold: faithfulness and citations at the slip's judge ``threshold`` (route's
JudgePolicy) unless ``STRATA_JUDGE__*_THRESHOLD`` overrides it, relevance and the rubric's
mean at their settings.

The answer of a CandidateAnswer comes from a single replica (slips without consensus), an
AnswerDecided's from consensus; both carry the context the answer was generated from.  An
answer infer gave up on (``degradation = expired``) is passed on unscored, so guard_out
emits the explicit ``expired`` result.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Final

import structlog

from stratamesh.bus.middleware import Context
from stratamesh.bus.service import Service
from stratamesh.bus.topics import INFERENCE_COMPLETED, REQUESTS_DECIDED, Stage
from stratamesh.config import JudgeSettings, Settings
from stratamesh.errors import ConfigError
from stratamesh.events import AnswerDecided, AnswerJudged, CandidateAnswer, Cost, RoutingSlip
from stratamesh.models.embedders import Embedder, LocalEmbedder, model_stamp
from stratamesh.models.grounding import GroundingModel

from .faithfulness import Grounder, Grounding
from .formats import check_format
from .metrics import judge_metrics
from .revision import cap_of, critique_of, rewound
from .rubric import Rubric, RubricResult

__all__ = ["EXPIRED", "STAGE_LATENCY_KEY", "JudgeEngine", "build_service", "engine", "service"]

log = structlog.get_logger("stratamesh.judge")

SERVICE: Final = "judge"
STAGE_LATENCY_KEY: Final = "judge"
EXPIRED: Final = "expired"

Source = AnswerDecided | CandidateAnswer


@dataclass(frozen=True, slots=True)
class Scores:
    grounding: Grounding
    format_ok: bool
    rubric: RubricResult
    passed: bool
    problems: list[str]


class JudgeEngine:
    """The embedder, grounding model and rubric of this process."""

    def __init__(self) -> None:
        self.settings: Settings | None = None
        self.embedder: Embedder | None = None
        self.grounder: Grounder | None = None
        self.rubric = Rubric()

    @property
    def cfg(self) -> JudgeSettings:
        if self.settings is None:
            raise ConfigError("the judge service is not bound to settings")
        return self.settings.judge

    def bind(self, settings: Settings) -> None:
        if self.settings is settings:
            return
        self.settings = settings
        cfg = settings.judge
        model = GroundingModel.load(cfg.grounding_model)
        if cfg.claim_threshold is not None:
            model = GroundingModel(model.weights, model.bias, cfg.claim_threshold, model.version)
        # The grounding weights were fitted on MiniLM's features: always the bundled MiniLM,
        # whatever embedder the deployment's knowledge plane uses.
        self.embedder = self.embedder or LocalEmbedder.shared()
        self.grounder = Grounder(self.embedder, model)
        self.rubric.bind(settings)

    def use_embedder(self, embedder: Embedder) -> None:
        """Share an already loaded MiniLM (tests, one process running several services)."""
        self.embedder = embedder
        if self.grounder is not None:
            self.grounder = Grounder(embedder, self.grounder.model)

    async def start(self) -> None:
        assert self.embedder is not None
        await self.embedder.embed(["warm up"])  # load MiniLM before taking partitions

    async def close(self) -> None:
        await self.rubric.close()

    async def score(self, event: Source, answer_model: str) -> Scores:
        assert self.grounder is not None
        cfg = self.cfg
        policy = event.route.judge
        threshold = policy.threshold
        param = event.slip.stage_params().get("threshold")
        if param:
            try:
                threshold = float(param)
            except ValueError:
                log.warning("bad judge threshold on slip", value=param[:40])
        g = await self.grounder.assess(
            event.query.prompt, event.answer, event.citations, event.context
        )
        format_ok, format_problems = check_format(event.query, event.answer, event.structured)
        rubric = await self.rubric.grade(
            question=event.query.prompt,
            answer=event.structured or event.answer,
            context=event.context,
            answer_model=answer_model,
            criteria=policy.rubric,
        )
        problems = list(g.problems)
        problems += [f"the JSON answer breaks the requested schema: {p}" for p in format_problems]
        faith_min = threshold if cfg.faithfulness_threshold is None else cfg.faithfulness_threshold
        cite_min = threshold if cfg.citation_threshold is None else cfg.citation_threshold
        checks = [
            g.faithfulness >= faith_min,
            g.citation_score >= cite_min,
            g.relevance >= cfg.relevance_threshold,
            format_ok,
        ]
        if g.relevance < cfg.relevance_threshold:
            problems.append("the answer does not address the question.")
        if rubric.scores:
            mean = sum(rubric.scores.values()) / len(rubric.scores)
            checks.append(mean >= cfg.rubric_threshold)
            if mean < cfg.rubric_threshold:
                low = sorted(k for k, v in rubric.scores.items() if v < cfg.rubric_threshold)
                problems.append(f"the judge model rated it low on: {', '.join(low)}.")
        return Scores(g, format_ok, rubric, all(checks), problems)

    async def judge(self, event: Source, ctx: Context) -> None:
        started = time.perf_counter()
        degradation: str | None
        if isinstance(event, CandidateAnswer):
            model = (
                event.model
                if "@" in event.model or not event.revision
                else f"{event.model}@{event.revision}"
            )
            degradation = event.degradation
        else:
            model, degradation = event.model, event.versions.get("degradation")
        versions = dict(event.versions)
        if degradation:
            versions["degradation"] = degradation
        cap = cap_of(event.route.judge, self.cfg.max_revisions)
        versions["judge.revisions"] = f"{event.revision_round}/{cap}"
        latency = dict(event.stage_latency_ms)
        if degradation == EXPIRED:
            versions["judge.rubric"] = "skipped: no answer (the deadline passed before infer)"
            latency[STAGE_LATENCY_KEY] = (time.perf_counter() - started) * 1000.0
            out = self._judged(event, ctx, model, versions, latency, None, event.cost)
            ctx.publish(out, next_stage=out.slip.next_stage)
            judge_metrics().outcomes.labels(EXPIRED).inc()
            return
        scores = await self.score(event, model)
        assert self.grounder is not None and self.embedder is not None
        versions["judge.grounding"] = self.grounder.model.version
        versions["judge.embedder"] = model_stamp(self.embedder)
        versions["judge.rubric"] = scores.rubric.note
        cost = Cost(
            input_tokens=event.cost.input_tokens + scores.rubric.cost.input_tokens,
            output_tokens=event.cost.output_tokens + scores.rubric.cost.output_tokens,
            cost_usd=event.cost.cost_usd + scores.rubric.cost.cost_usd,
        )
        back = None
        if not scores.passed and event.revision_round < cap:
            back = rewound(event.slip)
        latency[STAGE_LATENCY_KEY] = (time.perf_counter() - started) * 1000.0
        out = self._judged(event, ctx, model, versions, latency, scores, cost, slip_back=back)
        ctx.publish(out, next_stage=out.slip.next_stage)
        outcome = "passed" if scores.passed else ("revise" if back is not None else "failed")
        judge_metrics().outcomes.labels(outcome).inc()
        g = scores.grounding
        for kind, value in (
            ("faithfulness", g.faithfulness),
            ("citations", g.citation_score),
            ("relevance", g.relevance),
        ):
            judge_metrics().scores.labels(kind).observe(value)
        log.info(
            "judged",
            outcome=outcome,
            round=event.revision_round,
            faithfulness=round(g.faithfulness, 3),
            citations=round(g.citation_score, 3),
            relevance=round(g.relevance, 3),
            claims=len(g.claims),
            rubric=scores.rubric.note,
        )

    def _judged(
        self,
        event: Source,
        ctx: Context,
        model: str,
        versions: dict[str, str],
        latency: dict[str, float],
        scores: Scores | None,
        cost: Cost,
        *,
        slip_back: RoutingSlip | None = None,
    ) -> AnswerJudged:
        slip = slip_back or event.slip.advanced()
        g = scores.grounding if scores else None
        return AnswerJudged.derive(
            event,
            stage=ctx.service,
            producer=ctx.service,
            tenant=ctx.tenant,
            slip=slip,
            model=model,
            faithfulness=g.faithfulness if g else 0.0,
            relevance=g.relevance if g else 0.0,
            citation_score=g.citation_score if g else 0.0,
            format_ok=scores.format_ok if scores else True,
            rubric=scores.rubric.scores if scores else {},
            judge_model=scores.rubric.judge_model if scores else "none",
            passed=scores.passed if scores else False,
            critique=critique_of(scores.problems) if scores and scores.problems else None,
            cost=cost,
            stage_latency_ms=latency,
            versions=versions,
        )


def build_service(engine: JudgeEngine) -> Service:
    """The judge service around ``engine`` (tests build their own engine)."""
    svc = Service(SERVICE)

    @svc.on_bind
    def _bind(settings: Settings) -> None:
        engine.bind(settings)

    @svc.on_start
    async def _start(settings: Settings) -> None:
        engine.bind(settings)
        await engine.start()

    @svc.on_stop
    async def _stop() -> None:
        await engine.close()

    @svc.subscribe(REQUESTS_DECIDED, stage=Stage.JUDGE)
    async def on_decided(event: AnswerDecided, ctx: Context) -> None:
        await engine.judge(event, ctx)

    # Slips without consensus: infer's single candidate comes straight here.
    @svc.subscribe(INFERENCE_COMPLETED, stage=Stage.JUDGE)
    async def on_completed(event: CandidateAnswer, ctx: Context) -> None:
        await engine.judge(event, ctx)

    return svc


engine = JudgeEngine()
service = build_service(engine)
