"""The infer service: a grounded, cited, signed answer per replica.

    requests.routed    (RequestRouted,    strata-next = infer)  ─┐
    requests.retrieved (ContextRetrieved, strata-next = infer)  ─┼─► inference.completed
    requests.judged    (AnswerJudged,     strata-next = infer)  ─┘  (CandidateAnswer,
                                                                     strata-next = slip's next)

Revision rounds: judge sends an answer below its thresholds back with a critique, the slip
rewound to this infer stage.  The answer is regenerated from the same passages with the
``revise`` template: the previous answer as the model's own turn, then the critique
(:func:`.prompting.with_revision`); the CandidateAnswer carries ``revision_round`` + 1 and
the slip moves on as usual, so it reaches judge again (which caps the rounds).

Per request: the prompt template named by ``route.template_version`` (the task's template
when that one is unknown here; the version actually used is recorded), the canary right
after the shared prefix, the retrieved chunks numbered [1]..[n] (:mod:`.prompting`); then
the degradation plan (:mod:`.tiers`): the full tier's fallback chain for ``route.model``,
the reduced tier's backend, and the extractive answer that needs no model
(:mod:`.fallback`), all within ``settings.infer.attempts`` calls and the request deadline.

Replicas: ``service`` is replica 1 (identity and group ``infer``); :func:`replica` (e.g.
``replica(2)`` = ``infer.r2``) is the same handlers under another identity and consumer
group, so every replica sees every request.  Replica *k* answers only when the slip asks
for at least *k* replicas (the infer stage's ``replicas`` parameter, else
``route.consensus.replicas``), and signs its CandidateAnswer with its own Ed25519 key
(``keys/<identity>.key`` or ``STRATA_SECURITY__PRIVATE_KEY``).

A request whose deadline passes before any tier answered gets a CandidateAnswer with
``degradation = "expired"`` and an empty answer, sent on along the slip, so guard_out can
emit the explicit ``expired`` result instead of the request going silent.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Mapping
from typing import Final

import structlog

from stratamesh.bus.envelope import now_ms
from stratamesh.bus.middleware import Context
from stratamesh.bus.service import Service
from stratamesh.bus.topics import REQUESTS_JUDGED, REQUESTS_RETRIEVED, REQUESTS_ROUTED, Stage
from stratamesh.config import InferSettings, Settings
from stratamesh.errors import ConfigError, Poison
from stratamesh.events import (
    AnswerJudged,
    CandidateAnswer,
    Citation,
    ContextRetrieved,
    Cost,
    RequestRouted,
    SamplingParams,
)
from stratamesh.models.llm.base import Completion, CompletionRequest, LLMBackend, Sampling
from stratamesh.models.llm.local import SMOLLM2_MODEL_ID, LocalBackend
from stratamesh.models.llm.openai_http import OpenAIChatBackend
from stratamesh.prompts import PromptTemplate, UnknownTemplate, registry
from stratamesh.resilience.breaker import breaker_metrics
from stratamesh.security.keys import SigningKey, load_signing_key

from .fallback import Attempts, ChainFailed, FallbackChain, GuardedBackend
from .metrics import infer_metrics
from .prompting import (
    POST_HOC,
    Prompt,
    attribute,
    build_prompt,
    citations_of,
    extractive_answer,
    with_revision,
)
from .tiers import Degradation, Plan, Tier

__all__ = [
    "EXPIRED",
    "MODEL_LATENCY_KEY",
    "STAGE_LATENCY_KEY",
    "InferEngine",
    "build_service",
    "engine",
    "replica",
    "replica_index",
    "service",
]

log = structlog.get_logger("stratamesh.infer")

SERVICE: Final = "infer"
STAGE_LATENCY_KEY: Final = "infer"
MODEL_LATENCY_KEY: Final = "infer.model"
EXPIRED: Final = "expired"  # CandidateAnswer.degradation when the deadline passed first
REVISION_TEMPLATE: Final = "revise"  # prompt template of revision rounds (latest version)
Source = RequestRouted | ContextRetrieved | AnswerJudged
# Below this call timeout, a timeout says more about the request's deadline than about the
# backend: it does not count against the backend's breaker or the degradation tiers.
FAULT_TIMEOUT_S: Final = 2.0
_REPLICA = re.compile(r"\.r(\d+)$")


def replica_index(identity: str) -> int:
    """1 for ``infer``, k for ``infer.rk``."""
    match = _REPLICA.search(identity)
    return int(match.group(1)) if match else 1


class InferEngine:
    """Backends, breakers, tiers and keys of this process (shared by its replicas)."""

    def __init__(self) -> None:
        self.settings: Settings | None = None
        self.backends: dict[str, LLMBackend] = {}
        self.guarded: dict[str, GuardedBackend] = {}
        self.degradation = Degradation()
        self.signers: dict[str, SigningKey] = {}
        self._injected = False

    # -- configuration --------------------------------------------------------------------

    @property
    def cfg(self) -> InferSettings:
        if self.settings is None:
            raise ConfigError("the infer service is not bound to settings")
        return self.settings.infer

    def bind(self, settings: Settings) -> None:
        """Adopt settings; backends are created (not loaded) unless tests injected some."""
        if self.settings is settings:
            return
        self.settings = settings
        cfg = settings.infer
        self.degradation = Degradation(
            degrade_after=cfg.degrade_after,
            recover_after_s=cfg.recover_after_s,
            recover_probes=cfg.recover_probes,
        )
        if not self._injected:
            self._adopt(self._make_backends(settings))

    def use_backends(self, backends: Mapping[str, LLMBackend]) -> None:
        """Serve with these backends (tests; an embedding application's own servers)."""
        self._injected = True
        self._adopt(dict(backends))

    def use_signing_key(self, key: SigningKey) -> None:
        """Sign as ``key.identity`` with this key (tests; keys held outside the keys folder)."""
        self.signers[key.identity] = key

    def _adopt(self, backends: dict[str, LLMBackend]) -> None:
        recovery = self.settings.infer.breaker_recovery_s if self.settings else 60.0
        self.backends = backends
        self.guarded = {
            name: GuardedBackend.of(b, recovery_s=recovery) for name, b in backends.items()
        }

    @staticmethod
    def _make_backends(settings: Settings) -> dict[str, LLMBackend]:
        cfg = settings.infer
        backends: dict[str, LLMBackend] = {
            "local": LocalBackend(
                models_dir=cfg.models_dir or settings.home / "models",
                runtime=cfg.local_runtime,
                threads=cfg.local_threads,
                timeout_s=cfg.timeout_s,
            )
        }
        if cfg.endpoint:
            backends["openai"] = OpenAIChatBackend(
                cfg.endpoint,
                cfg.served_model or SMOLLM2_MODEL_ID,
                name="openai",
                revision=cfg.revision,
                api_key=cfg.api_key.get_secret_value() if cfg.api_key else None,
                timeout_s=cfg.timeout_s,
                adapters=cfg.adapters,
            )
        elif cfg.backend == "openai":
            raise ConfigError("STRATA_INFER__BACKEND=openai needs STRATA_INFER__ENDPOINT")
        return backends

    def chain_names(self, model: str) -> list[str]:
        """The full tier's fallback order for a route model id (``id`` or ``id@rev``)."""
        cfg = self.cfg
        base = cfg.chain or [cfg.backend, *(["local"] if cfg.backend != "local" else [])]
        first = cfg.models.get(model) or cfg.models.get(model.partition("@")[0])
        order = [first, *[b for b in base if b != first]] if first else list(base)
        names = [n for n in order if n in self.guarded]
        if not names:
            raise ConfigError(f"no configured backend among {order} (have {sorted(self.guarded)})")
        return names

    def chain(self, names: list[str]) -> FallbackChain:
        return FallbackChain([self.guarded[n] for n in names])

    async def start(self) -> None:
        """Load the backends the chains use (the local model) before taking partitions."""
        cfg = self.cfg
        used = {*self.chain_names(""), cfg.reduced_backend}
        for name in sorted(used & set(self.backends)):
            await self.backends[name].start()

    async def close(self) -> None:
        for backend in self.backends.values():
            await backend.close()

    def signer(self, identity: str) -> SigningKey:
        key = self.signers.get(identity)
        if key is None:
            assert self.settings is not None
            key = self.signers[identity] = load_signing_key(self.settings, identity)
        return key

    def price(self, model: str, usage_in: int, usage_out: int) -> float:
        cfg = self.cfg
        per_m_in, per_m_out = cfg.prices.get(model, cfg.default_price)
        return (usage_in * per_m_in + usage_out * per_m_out) / 1_000_000

    # -- one request ----------------------------------------------------------------------

    def template(self, ref: str, task: str) -> PromptTemplate:
        try:
            return registry.get(ref)
        except UnknownTemplate:
            fallback = registry.for_task(task)
            log.warning("unknown prompt template", asked=ref, used=fallback.version)
            return fallback

    def sampling(self, event: Source, tier: Tier) -> Sampling:
        cfg = self.cfg
        query = event.query
        max_tokens = query.max_tokens or cfg.max_tokens
        if event.route.budget.max_tokens is not None:
            max_tokens = min(max_tokens, int(event.route.budget.max_tokens))
        if tier is Tier.REDUCED:
            max_tokens = min(max_tokens, cfg.reduced_max_tokens)
        temperature = cfg.temperature if query.temperature is None else query.temperature
        return Sampling(
            temperature=max(0.0, temperature),
            top_p=cfg.top_p,
            max_tokens=max(1, max_tokens),
            seed=cfg.seed,
        )

    async def answer(self, event: Source, ctx: Context) -> None:
        started = time.perf_counter()
        identity = ctx.service
        wanted = event.slip.stage_params().get("replicas")
        replicas = int(wanted) if wanted and wanted.isdigit() else event.route.consensus.replicas
        if replica_index(identity) > max(1, replicas):
            return  # this slip asks for fewer replicas than this one's number
        cfg = self.cfg
        chunks: list[Citation] = [] if isinstance(event, RequestRouted) else list(event.context)
        revision_round = event.revision_round + 1 if isinstance(event, AnswerJudged) else 0
        if isinstance(event, AnswerJudged):
            template = self.template(REVISION_TEMPLATE, event.query.task)
        else:
            template = self.template(event.route.template_version, event.query.task)
        try:
            prompt = build_prompt(
                template, event.query, chunks, max_context_chars=cfg.max_context_chars
            )
        except ValueError as exc:  # a response_format that is not a JSON schema object
            log.warning("response_format ignored", reason=str(exc)[:200])
            query = event.query.model_copy(update={"response_format": None})
            prompt = build_prompt(template, query, chunks, max_context_chars=cfg.max_context_chars)
        if isinstance(event, AnswerJudged):
            previous = event.structured or event.answer
            prompt = with_revision(prompt, template, previous, event.critique or "")
        deadline_ms = ctx.envelope.deadline_ms
        deadline = (
            time.monotonic() + (deadline_ms - now_ms()) / 1000 if deadline_ms is not None else None
        )
        budget = Attempts(cfg.attempts, deadline)
        plan = self.degradation.plan()
        outcome = await self._serve(event, prompt, plan, budget)
        sampling = self.sampling(event, outcome.tier if outcome else Tier.FULL)
        latency = dict(event.stage_latency_ms)
        latency[STAGE_LATENCY_KEY] = (time.perf_counter() - started) * 1000.0
        if outcome is not None and outcome.completion is not None:
            # The model call's share of `infer` (not an extra stage: do not add it up), so the
            # mesh overhead can be told apart from model time.
            latency[MODEL_LATENCY_KEY] = outcome.completion.latency_ms
        slip = event.slip.advanced()
        versions = dict(event.versions)
        versions["template"] = template.version
        if outcome is None:  # the deadline passed before any tier answered
            tier_label, completion, answer, structured = EXPIRED, None, "", None
            cited: list[Citation] = []
            model, revision = event.route.model, ""
        else:
            tier_label, completion = outcome.tier.label, outcome.completion
            answer, structured, cited = outcome.answer, outcome.structured, outcome.cited
            model = completion.model if completion else "extractive"
            revision = completion.revision if completion else "none"
        if completion is not None:
            versions["model"] = f"{completion.model}@{completion.revision}"
        if outcome is not None and outcome.post_hoc:
            versions["citations"] = POST_HOC
        usage_in = completion.usage.prompt_tokens if completion else 0
        usage_out = completion.usage.completion_tokens if completion else 0
        cost_usd = self.price(model, usage_in, usage_out)
        candidate = CandidateAnswer.derive(
            event,
            stage=identity,
            producer=identity,
            tenant=ctx.tenant,
            slip=slip,
            stage_latency_ms=latency,
            versions=versions,
            context=prompt.chunks,
            replica_id=identity,
            model=model,
            revision=revision,
            adapter=completion.adapter if completion else None,
            template_version=template.version,
            seed=sampling.seed,
            sampling=SamplingParams(
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                max_tokens=sampling.max_tokens,
                stop=list(sampling.stop),
            ),
            answer=answer,
            structured=structured,
            citations=cited,
            cost=Cost(input_tokens=usage_in, output_tokens=usage_out, cost_usd=cost_usd),
            ttft_ms=completion.ttft_ms if completion else None,
            degradation=tier_label,
            revision_round=revision_round,
            signature=b"",
        )
        signature = self.signer(identity).sign(candidate.signing_payload())
        ctx.publish(
            candidate.model_copy(update={"signature": signature}), next_stage=slip.next_stage
        )
        m = infer_metrics()
        m.answers.labels(identity, tier_label).inc()
        if completion is not None:
            m.tokens.labels(ctx.tenant, model, "in").inc(usage_in)
            m.tokens.labels(ctx.tenant, model, "out").inc(usage_out)
            m.cost_usd.labels(ctx.tenant, model).inc(cost_usd)
            if completion.ttft_ms is not None:
                m.ttft_seconds.labels(completion.backend).observe(completion.ttft_ms / 1000)
        log.info(
            "answered",
            tier=tier_label,
            model=model,
            tokens_in=usage_in,
            tokens_out=usage_out,
            cited=len(cited),
            latency_ms=round(latency[STAGE_LATENCY_KEY], 1),
        )

    async def _serve(
        self,
        event: Source,
        prompt: Prompt,
        plan: Plan,
        budget: Attempts,
    ) -> _Outcome | None:
        cfg = self.cfg
        try:
            for tier in plan.tiers:
                if budget.expired:
                    return None
                if tier is Tier.EXTRACTIVE:
                    answer, cited = extractive_answer(event.query.prompt, prompt.chunks)
                    self.degradation.record(plan, tier, True)
                    return _Outcome(tier, None, answer, None, cited, False)
                if tier is Tier.FULL:
                    names = self.chain_names(event.route.model)
                    adapter = event.route.adapter
                else:
                    names = [cfg.reduced_backend] if cfg.reduced_backend in self.guarded else []
                    adapter = None
                if not names:
                    continue
                sampling = self.sampling(event, tier)

                def make(
                    backend: LLMBackend,
                    remaining: float | None,
                    s: Sampling = sampling,
                    a: str | None = adapter,
                ) -> CompletionRequest:
                    timeout = cfg.timeout_s if remaining is None else min(cfg.timeout_s, remaining)
                    return CompletionRequest(prompt.messages, s, prompt.json_schema, a, timeout)

                # Keep one attempt for each model tier still below this one.
                reserve = sum(1 for t in plan.tiers if tier < t < Tier.EXTRACTIVE)
                try:
                    completion = await self.chain(names).run(make, budget, reserve=reserve)
                except ChainFailed as exc:
                    remaining = budget.remaining_s()
                    own_deadline = remaining is not None and remaining < FAULT_TIMEOUT_S
                    if not own_deadline:
                        self.degradation.record(plan, tier, False)
                    log.warning("tier failed", tier=tier.label, error=str(exc)[:300])
                    continue
                self.degradation.record(plan, tier, True)
                text = completion.text
                cited, unknown = citations_of(text, prompt.chunks)
                if unknown:
                    log.info("answer cites unknown passages", numbers=unknown[:10])
                post_hoc = False
                if (
                    not cited
                    and prompt.chunks
                    and cfg.attribute_citations
                    and not prompt.json_schema
                ):
                    text, cited = attribute(
                        text, prompt.chunks, min_overlap=cfg.attribution_min_overlap
                    )
                    post_hoc = bool(cited)
                structured = (
                    json.dumps(completion.structured, sort_keys=True)
                    if prompt.json_schema is not None and completion.structured is not None
                    else None
                )
                return _Outcome(tier, completion, text, structured, cited, post_hoc)
            return None
        finally:
            self.degradation.release(plan)


class _Outcome:
    __slots__ = ("answer", "cited", "completion", "post_hoc", "structured", "tier")

    def __init__(
        self,
        tier: Tier,
        completion: Completion | None,
        answer: str,
        structured: str | None,
        cited: list[Citation],
        post_hoc: bool,
    ) -> None:
        self.tier = tier
        self.completion = completion
        self.answer = answer
        self.structured = structured
        self.cited = cited
        self.post_hoc = post_hoc


def build_service(engine: InferEngine) -> Service:
    """Replica 1 of the infer service around ``engine`` (tests build their own engine)."""
    svc = Service(SERVICE)

    @svc.on_bind
    def _bind(settings: Settings) -> None:
        engine.bind(settings)
        breaker_metrics()

    @svc.on_start
    async def _start(settings: Settings) -> None:
        engine.bind(settings)
        await engine.start()  # load the local model before taking partitions

    @svc.on_stop
    async def _stop() -> None:
        await engine.close()

    @svc.subscribe(REQUESTS_ROUTED, stage=Stage.INFER)
    async def on_routed(event: RequestRouted, ctx: Context) -> None:
        await engine.answer(event, ctx)

    @svc.subscribe(REQUESTS_RETRIEVED, stage=Stage.INFER)
    async def on_retrieved(event: ContextRetrieved, ctx: Context) -> None:
        await engine.answer(event, ctx)

    @svc.subscribe(REQUESTS_JUDGED, stage=Stage.INFER)
    async def on_judged(event: AnswerJudged, ctx: Context) -> None:
        if event.passed or not event.critique:
            # Only judge's revision requests are addressed here; anything else is a broken
            # slip, visible in the DLQ rather than answered twice.
            raise Poison("AnswerJudged addressed to infer without a critique to revise")
        await engine.answer(event, ctx)

    return svc


engine = InferEngine()
service = build_service(engine)


def replica(k: int, base: Service = service) -> Service:
    """Replica ``k`` (≥ 2) of ``base``: identity and consumer group ``infer.r<k>``, same
    handlers (and engine: one model load per process)."""
    return base.replica(k)
