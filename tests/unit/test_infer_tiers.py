"""Degradation tiers: step down fast, step up only after a quiet period and several probes."""

from __future__ import annotations

from stratamesh.services.infer.tiers import Degradation, Plan, Tier


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def fail(d: Degradation, times: int = 1) -> None:
    for _ in range(times):
        plan = d.plan()
        d.record(plan, plan.tiers[0], False)
        d.release(plan)


def test_full_until_consecutive_failures_then_one_step_down_each_time() -> None:
    clock = Clock()
    d = Degradation(degrade_after=3, recover_after_s=30, recover_probes=2, clock=clock)
    assert d.plan() == Plan((Tier.FULL, Tier.REDUCED, Tier.EXTRACTIVE), probe=False)
    fail(d, 2)
    plan = d.plan()
    d.record(plan, Tier.FULL, True)  # a success resets the run of failures
    fail(d, 2)
    assert d.tier is Tier.FULL
    fail(d)
    assert d.tier is Tier.REDUCED
    assert d.plan() == Plan((Tier.REDUCED, Tier.EXTRACTIVE), probe=False)
    fail(d, 3)
    assert d.tier is Tier.EXTRACTIVE
    fail(d, 5)  # nowhere further to go
    assert d.tier is Tier.EXTRACTIVE


def test_a_lower_tier_answering_after_the_current_one_failed_changes_nothing_for_it() -> None:
    d = Degradation(degrade_after=2, clock=Clock())
    plan = d.plan()
    d.record(plan, Tier.FULL, False)
    d.record(plan, Tier.REDUCED, True)  # the request was served one tier down
    plan = d.plan()
    d.record(plan, Tier.FULL, False)
    assert d.tier is Tier.REDUCED


def test_recovery_needs_the_quiet_period_and_enough_probe_successes() -> None:
    clock = Clock()
    d = Degradation(degrade_after=1, recover_after_s=30, recover_probes=3, clock=clock)
    fail(d)
    assert d.tier is Tier.REDUCED
    clock.now = 29.0
    assert d.plan().probe is False  # still quiet period
    clock.now = 30.0
    probe = d.plan()
    assert probe == Plan((Tier.FULL, Tier.REDUCED, Tier.EXTRACTIVE), probe=True)
    # one probe at a time: the others keep being served at the degraded tier
    assert d.plan() == Plan((Tier.REDUCED, Tier.EXTRACTIVE), probe=False)
    d.record(probe, Tier.FULL, True)
    for _ in range(2):
        p = d.plan()
        assert p.probe
        d.record(p, Tier.FULL, True)
    assert d.tier is Tier.FULL


def test_a_failed_probe_restarts_the_quiet_period_and_the_probe_count() -> None:
    clock = Clock()
    d = Degradation(degrade_after=1, recover_after_s=10, recover_probes=2, clock=clock)
    fail(d)
    clock.now = 10.0
    p = d.plan()
    d.record(p, Tier.FULL, True)
    p = d.plan()
    d.record(p, Tier.FULL, False)  # flapping: back to waiting
    d.record(p, Tier.REDUCED, True)
    assert d.tier is Tier.REDUCED
    clock.now = 19.0
    assert d.plan().probe is False
    clock.now = 20.0
    p = d.plan()
    assert p.probe
    d.record(p, Tier.FULL, True)
    assert d.tier is Tier.REDUCED  # the earlier success no longer counts
    d.record(d.plan(), Tier.FULL, True)
    assert d.tier is Tier.FULL


def test_a_probe_released_without_an_outcome_frees_the_probe_slot() -> None:
    clock = Clock()
    d = Degradation(degrade_after=1, recover_after_s=0, recover_probes=1, clock=clock)
    fail(d)
    p = d.plan()
    assert p.probe
    d.release(p)
    assert d.plan().probe


def test_labels_are_the_event_values() -> None:
    assert [t.label for t in Tier] == ["full", "reduced", "extractive"]
