"""The packaged routing policy and the policy language: classes + lane → slip."""

from __future__ import annotations

from typing import Any

import pytest

from stratamesh.config import RouteSettings
from stratamesh.errors import ConfigError
from stratamesh.events import ConsensusMode
from stratamesh.models.intent import Classification
from stratamesh.services.route.policy import Policy, template_version

ALL_STAGES = ["retrieve", "infer", "consensus", "judge", "guard_out"]


def c(risk: float = 0.1, complexity: float = 0.1, intent: str = "balance") -> Classification:
    return Classification(intent, 0.9, "banking", complexity=complexity, risk=risk)


def stages(policy: Policy, cls: Classification, **kw: Any) -> list[str]:
    settings = kw.pop("settings", RouteSettings())
    d = policy.decide(cls, task=kw.pop("task", "qa"), lane=kw.pop("lane", "pro"), settings=settings)
    return [s.stage for s in d.slip.stages]


@pytest.fixture(scope="module")
def policy() -> Policy:
    return Policy.load()


def test_default_request_gets_retrieve_infer_guard_out(policy: Policy) -> None:
    d = policy.decide(c(), task="qa", lane="free", settings=RouteSettings())
    assert [s.stage for s in d.slip.stages] == ["retrieve", "infer", "guard_out"]
    assert d.slip.current == 0 and d.slip.next_stage == "retrieve"
    assert d.rule == "default" and d.tier.value == "small" and d.retrieval.enabled
    assert d.consensus.mode == ConsensusMode.SINGLE and not d.judge.enabled
    assert d.downgrades == () and d.est_cost_usd > 0
    assert template_version(d.template) == "qa@1"


def test_high_risk_asks_for_consensus_and_judge_when_deployed(policy: Policy) -> None:
    settings = RouteSettings(enabled_stages=ALL_STAGES, adapters=["finance-qa@1"])
    d = policy.decide(c(risk=0.9), task="qa", lane="enterprise", settings=settings)
    assert [s.stage for s in d.slip.stages] == ALL_STAGES
    assert d.rule == "high-risk" and d.adapter == "finance-qa@1"
    infer, consensus = d.slip.stages[1], d.slip.stages[2]
    assert infer.params["replicas"] == "3" and consensus.params["mode"] == "majority"
    assert d.judge.enabled and d.judge.threshold == 0.75 and d.retrieval.rerank
    assert d.est_cost_usd == pytest.approx(3 * 0.001)  # three replicas of a mid model

    hard = policy.decide(
        c(risk=0.9, complexity=0.7), task="qa", lane="enterprise", settings=settings
    )
    assert hard.rule == "high-risk-complex" and hard.consensus.mode == ConsensusMode.BFT
    assert (hard.consensus.replicas, hard.consensus.f) == (4, 1)


def test_stages_and_adapters_the_deployment_lacks_are_dropped(policy: Policy) -> None:
    request_plane = RouteSettings(enabled_stages=["retrieve", "infer", "guard_out"])
    d = policy.decide(c(risk=0.9), task="qa", lane="enterprise", settings=request_plane)
    assert [s.stage for s in d.slip.stages] == ["retrieve", "infer", "guard_out"]
    assert d.adapter is None and d.consensus.mode == ConsensusMode.SINGLE
    assert not d.judge.enabled and "replicas" not in d.slip.stages[1].params
    assert set(d.downgrades) == {"adapter:finance-qa@1", "stage:consensus:majority", "stage:judge"}


def test_a_vote_needs_as_many_deployed_replicas_as_it_asks(policy: Policy) -> None:
    settings = RouteSettings(enabled_stages=ALL_STAGES, adapters=["finance-qa@1"])
    few = policy.decide(
        c(risk=0.9), task="qa", lane="enterprise", settings=settings, deployed_replicas=2
    )
    assert few.consensus.mode == ConsensusMode.SINGLE and few.consensus.replicas == 1
    assert [s.stage for s in few.slip.stages] == ["retrieve", "infer", "judge", "guard_out"]
    assert "replicas" not in few.slip.stages[1].params
    assert few.downgrades == ("replicas:majority:3>2",)
    enough = policy.decide(
        c(risk=0.9), task="qa", lane="enterprise", settings=settings, deployed_replicas=3
    )
    assert enough.consensus.mode == ConsensusMode.MAJORITY and enough.downgrades == ()


def test_lane_caps_the_tier(policy: Policy) -> None:
    enterprise = policy.decide(
        c(complexity=0.9), task="qa", lane="enterprise", settings=RouteSettings()
    )
    free = policy.decide(c(complexity=0.9), task="qa", lane="free", settings=RouteSettings())
    assert enterprise.tier.value == "large" and enterprise.downgrades == ()
    assert free.tier.value == "mid" and free.downgrades == ("tier:large>mid",)
    assert free.est_cost_usd < enterprise.est_cost_usd


def test_task_selects_template(policy: Policy) -> None:
    d = policy.decide(c(), task="summarise", lane="pro", settings=RouteSettings())
    assert d.rule == "summarise" and template_version(d.template) == "summarise@1"


def test_rules_match_on_every_condition() -> None:
    doc = {
        "tiers": {"small": {"model": "s"}, "large": {"model": "l"}},
        "retrieval": {"none": {"enabled": False}, "std": {"top_k": 3}},
        "defaults": {"tier": "small", "retrieval": "std"},
        "rules": [
            {
                "name": "vip-banking",
                "when": {"domains": ["banking"], "lanes": ["enterprise"], "in_scope": True},
                "tier": "large",
            },
            {"name": "oos", "when": {"in_scope": False}, "retrieval": "none"},
        ],
    }
    p = Policy(doc)
    assert stages(p, c(), lane="enterprise") == ["retrieve", "infer", "guard_out"]
    assert (
        p.decide(c(), task="qa", lane="enterprise", settings=RouteSettings()).tier.value == "large"
    )
    assert p.decide(c(), task="qa", lane="pro", settings=RouteSettings()).rule == "defaults"
    oos = Classification("oos", 0.2, "oos", complexity=0.1, risk=0.1)
    assert stages(p, oos) == ["infer", "guard_out"]  # retrieval off: straight to infer
    assert p.decide(oos, task="qa", lane="pro", settings=RouteSettings()).retrieval.top_k == 5


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"tiers": {"huge": {"model": "x"}}}, "unknown tier"),
        ({"rules": [{"name": "r", "when": {"colour": "red"}}]}, "unknown keys"),
        ({"rules": [{"name": "r", "tier": "large"}]}, r"no \[tiers\] entry"),
        ({"rules": [{"name": "r", "retrieval": "nope"}]}, "no retrieval plan"),
        ({"rules": [{"name": "r", "consensus": {"mode": "bft", "replicas": 3, "f": 1}}]}, r"3f\+1"),
        (
            {"rules": [{"name": "r", "consensus": {"mode": "majority", "replicas": 2}}]},
            "3 replicas",
        ),
        ({"lanes": {"gold": {"max_tier": "small"}}}, "bad lane"),
    ],
)
def test_broken_policies_fail_at_load(change: dict[str, Any], message: str) -> None:
    doc: dict[str, Any] = {
        "tiers": {"small": {"model": "s"}},
        "retrieval": {"std": {}},
        "defaults": {"tier": "small", "retrieval": "std"},
    }
    doc.update(change)
    with pytest.raises(ConfigError, match=message):
        Policy(doc)


def test_policy_file_errors_are_config_errors(tmp_path: Any) -> None:
    bad = tmp_path / "p.toml"
    bad.write_text("version = [")
    with pytest.raises(ConfigError):
        Policy.load(bad)
    with pytest.raises(ConfigError):
        Policy.load(tmp_path / "missing.toml")
