"""The declarative routing policy: request classes + tenant lane → route decision and slip.

The policy is a TOML file (the packaged ``policy.toml``, or ``STRATA_ROUTE__POLICY_FILE``);
see that file for the format.  :meth:`Policy.decide` is pure: the same classification,
task, lane and deployment always give the same slip, so a policy change can be re-scored by
replaying ``requests.admitted`` into a shadow route.

Slip shape::

    [retrieve]? infer(replicas) [consensus(mode, f)]? [judge]? guard_out

Stages the deployment does not run (``route.enabled_stages``) and adapters it does not
serve (``route.adapters``) are left out rather than routed into a void: the decision then
records what will actually happen, and :attr:`Decision.downgrades` says what was dropped.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Final

from stratamesh.bus.topics import Stage
from stratamesh.config import RouteSettings
from stratamesh.errors import ConfigError
from stratamesh.events import (
    Budget,
    ConsensusMode,
    ConsensusPolicy,
    JudgePolicy,
    RetrievalPlan,
    RoutingSlip,
    SlipStage,
    Tier,
)
from stratamesh.models.intent import Classification

from .limits import LANES

__all__ = ["TIERS", "Decision", "Policy", "Rule", "default_policy_path", "template_version"]

TIERS: Final = ("small", "mid", "large", "reasoning")  # cheapest first
_WHEN_KEYS: Final = frozenset(
    {
        "risk_min",
        "risk_max",
        "complexity_min",
        "complexity_max",
        "in_scope",
        "intents",
        "domains",
        "tasks",
        "lanes",
    }
)
_RULE_KEYS: Final = frozenset(
    {"name", "when", "tier", "adapter", "template", "retrieval", "consensus", "judge", "budget"}
)


def default_policy_path() -> Path:
    return Path(str(resources.files("stratamesh.services.route") / "policy.toml"))


def template_version(name: str) -> str:
    """``name@N`` of the newest registered prompt template ``name`` (a pinned ``name@N``
    is kept as given)."""
    if "@" in name:
        return name
    from stratamesh.prompts import registry

    return str(registry.get(name).version)


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    when: dict[str, Any]
    then: dict[str, Any]

    def matches(self, c: Classification, task: str, lane: str) -> bool:
        w = self.when
        checks = (
            ("risk_min", lambda v: c.risk >= v),
            ("risk_max", lambda v: c.risk < v),
            ("complexity_min", lambda v: c.complexity >= v),
            ("complexity_max", lambda v: c.complexity < v),
            ("in_scope", lambda v: c.in_scope == bool(v)),
            ("intents", lambda v: c.intent in v),
            ("domains", lambda v: c.domain in v),
            ("tasks", lambda v: task in v),
            ("lanes", lambda v: lane in v),
        )
        return all(test(w[key]) for key, test in checks if key in w)


@dataclass(frozen=True, slots=True)
class Decision:
    rule: str
    tier: Tier
    model: str
    adapter: str | None
    template: str  # template name or name@N
    retrieval: RetrievalPlan
    consensus: ConsensusPolicy
    judge: JudgePolicy
    budget: Budget
    est_cost_usd: float
    slip: RoutingSlip
    downgrades: tuple[str, ...] = field(default=())


class Policy:
    def __init__(self, doc: dict[str, Any], *, source: str = "<memory>") -> None:
        self.source = source
        try:
            self.version = str(doc.get("version", "unversioned"))
            self.defaults: dict[str, Any] = dict(doc.get("defaults", {}))
            self.tiers: dict[str, dict[str, Any]] = dict(doc["tiers"])
            self.retrieval: dict[str, dict[str, Any]] = dict(doc.get("retrieval", {}))
            self.lanes: dict[str, dict[str, Any]] = dict(doc.get("lanes", {}))
            self.rules = [self._rule(r) for r in doc.get("rules", [])]
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"routing policy {source}: {exc}") from exc
        self._validate()

    @classmethod
    def load(cls, path: Path | None = None) -> Policy:
        path = path or default_policy_path()
        try:
            doc = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"routing policy {path}: {exc}") from exc
        return cls(doc, source=str(path))

    @classmethod
    def from_settings(cls, settings: RouteSettings) -> Policy:
        return cls.load(settings.policy_file)

    @staticmethod
    def _rule(raw: dict[str, Any]) -> Rule:
        unknown = set(raw) - _RULE_KEYS
        when = dict(raw.get("when", {}))
        unknown |= set(when) - _WHEN_KEYS
        if unknown:
            raise ValueError(f"rule {raw.get('name')!r}: unknown keys {sorted(unknown)}")
        then = {k: v for k, v in raw.items() if k not in ("name", "when")}
        return Rule(str(raw.get("name", "unnamed")), when, then)

    def _validate(self) -> None:
        # Fail at load, not on the first request that reaches a broken rule.
        for tier in self.tiers:
            if tier not in TIERS:
                raise ConfigError(f"routing policy {self.source}: unknown tier {tier!r}")
        for lane, cfg in self.lanes.items():
            if lane not in LANES or cfg.get("max_tier", "reasoning") not in TIERS:
                raise ConfigError(f"routing policy {self.source}: bad lane {lane!r}")
        for rule in [Rule("defaults", {}, self.defaults), *self.rules]:
            merged = {**self.defaults, **rule.then}
            tier = merged.get("tier", "mid")
            if tier not in self.tiers:
                raise ConfigError(f"policy rule {rule.name!r}: tier {tier!r} has no [tiers] entry")
            plan = merged.get("retrieval", "standard")
            if isinstance(plan, str) and plan not in self.retrieval:
                raise ConfigError(f"policy rule {rule.name!r}: no retrieval plan {plan!r}")
            try:
                self._consensus(merged.get("consensus", {}))
                JudgePolicy.model_validate(merged.get("judge", {}))
                Budget.model_validate(merged.get("budget", {}))
                self._plan(plan)
            except ValueError as exc:
                raise ConfigError(f"policy rule {rule.name!r}: {exc}") from exc

    def _plan(self, plan: str | dict[str, Any]) -> RetrievalPlan:
        raw = self.retrieval[plan] if isinstance(plan, str) else plan
        return RetrievalPlan.model_validate(raw)

    @staticmethod
    def _consensus(raw: dict[str, Any]) -> ConsensusPolicy:
        c = ConsensusPolicy.model_validate({"mode": "single", **raw})
        if c.mode == ConsensusMode.MAJORITY and c.replicas < 3:
            raise ValueError("majority consensus needs at least 3 replicas")
        if c.mode == ConsensusMode.BFT and (c.f < 1 or c.replicas < 3 * c.f + 1):
            raise ValueError("bft consensus needs f ≥ 1 and replicas ≥ 3f+1")
        return c

    def _cap(self, tier: str, lane: str) -> tuple[str, str | None]:
        cap = self.lanes.get(lane, {}).get("max_tier")
        if cap is not None and TIERS.index(tier) > TIERS.index(cap):
            return cap, f"tier:{tier}>{cap}"
        return tier, None

    def decide(
        self,
        c: Classification,
        *,
        task: str,
        lane: str,
        settings: RouteSettings,
        remaining_usd: float | None = None,
        deployed_replicas: int | None = None,
    ) -> Decision:
        rule = next((r for r in self.rules if r.matches(c, task, lane)), None)
        name = rule.name if rule else "defaults"
        merged = {**self.defaults, **(rule.then if rule else {})}
        downgrades: list[str] = []
        tier, capped = self._cap(str(merged.get("tier", "mid")), lane)
        if capped:
            downgrades.append(capped)
        tier_cfg = self.tiers[tier]
        enabled = set(settings.enabled_stages)
        adapter = merged.get("adapter") or None
        if adapter is not None and adapter not in settings.adapters:
            downgrades.append(f"adapter:{adapter}")
            adapter = None
        retrieval = self._plan(merged.get("retrieval", "standard"))
        if retrieval.enabled and Stage.RETRIEVE not in enabled:
            downgrades.append("stage:retrieve")
            retrieval = retrieval.model_copy(update={"enabled": False})
        consensus = self._consensus(merged.get("consensus", {}))
        if consensus.mode != ConsensusMode.SINGLE and Stage.CONSENSUS not in enabled:
            downgrades.append(f"stage:consensus:{consensus.mode.value}")
            consensus = ConsensusPolicy(mode=ConsensusMode.SINGLE)
        if deployed_replicas is not None and consensus.replicas > deployed_replicas:
            # A vote among fewer replicas than asked would wait for answers that never come
            # and escalate every request: serve it unvoted instead, and say so.
            downgrades.append(
                f"replicas:{consensus.mode.value}:{consensus.replicas}>{deployed_replicas}"
            )
            consensus = ConsensusPolicy(mode=ConsensusMode.SINGLE)
        judge = JudgePolicy.model_validate(merged.get("judge", {}))
        if judge.enabled and Stage.JUDGE not in enabled:
            downgrades.append("stage:judge")
            judge = judge.model_copy(update={"enabled": False})
        budget = Budget.model_validate({**merged.get("budget", {}), "remaining_usd": remaining_usd})

        stages: list[SlipStage] = []
        if retrieval.enabled:
            stages.append(SlipStage(stage=Stage.RETRIEVE, params={"top_k": str(retrieval.top_k)}))
        infer_params = {"tier": tier}
        if consensus.replicas > 1:
            infer_params["replicas"] = str(consensus.replicas)
        stages.append(SlipStage(stage=Stage.INFER, params=infer_params))
        if consensus.mode != ConsensusMode.SINGLE:
            stages.append(
                SlipStage(
                    stage=Stage.CONSENSUS,
                    params={
                        "mode": consensus.mode.value,
                        "replicas": str(consensus.replicas),
                        "f": str(consensus.f),
                    },
                )
            )
        if judge.enabled:
            stages.append(SlipStage(stage=Stage.JUDGE, params={"threshold": str(judge.threshold)}))
        stages.append(SlipStage(stage=Stage.GUARD_OUT))
        return Decision(
            rule=name,
            tier=Tier(tier),
            model=str(tier_cfg["model"]),
            adapter=adapter,
            template=str(merged.get("template", "qa")),
            retrieval=retrieval,
            consensus=consensus,
            judge=judge,
            budget=budget,
            est_cost_usd=float(tier_cfg.get("est_cost_usd", 0.0)) * consensus.replicas,
            slip=RoutingSlip(stages=stages, current=0),
            downgrades=tuple(downgrades),
        )
