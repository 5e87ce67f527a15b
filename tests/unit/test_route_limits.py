"""Route's limits against a real Redis (STRATA_REDIS_URL, else the embedded server): token
bucket arithmetic, lane shedding on the shared pool, cost budget reservation and settle."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from stratamesh.config import RouteSettings, Settings
from stratamesh.services.route.limits import Limits, effective_lane
from stratamesh.stores.redis import open_redis

T0 = 1_800_000_000_000  # a fixed clock (ms); every key below is unique to the test


@pytest.fixture
async def redis(tmp_path: Path) -> AsyncIterator[aioredis.Redis]:
    r = open_redis(Settings(home=tmp_path, redis_url=os.environ.get("STRATA_REDIS_URL")))
    yield r
    await r.aclose()


def fresh(**kw: object) -> RouteSettings:
    return RouteSettings(capacity_pool=f"test-{uuid.uuid4().hex}", **kw)  # type: ignore[arg-type]


def tenant() -> str:
    return f"t-{uuid.uuid4().hex[:12]}"


def rid() -> str:
    return uuid.uuid4().hex


async def test_token_bucket_refills_at_its_rate(redis: aioredis.Redis) -> None:
    limits = Limits(redis, fresh(rate_per_s=2.0, burst=3.0))
    t = tenant()
    for _ in range(3):
        assert await limits.admit(t, "pro", rid(), at_ms=T0) is None
    refused = await limits.admit(t, "pro", rid(), at_ms=T0)
    assert refused is not None and refused.status == "over_budget" and refused.kind == "rate_limit"
    assert refused.retry_after_ms == 500  # one token at 2/s
    assert await limits.admit(t, "pro", rid(), at_ms=T0 + 499) is not None
    assert await limits.admit(t, "pro", rid(), at_ms=T0 + 500) is None
    # A long pause refills to the burst, not beyond.
    for _ in range(3):
        assert await limits.admit(t, "pro", rid(), at_ms=T0 + 60_000) is None
    assert await limits.admit(t, "pro", rid(), at_ms=T0 + 60_000) is not None


async def test_per_tenant_override_and_isolation(redis: aioredis.Redis) -> None:
    a, b = tenant(), tenant()
    limits = Limits(redis, fresh(rate_per_s=1.0, burst=5.0, tenant_rates={a: (1.0, 1.0)}))
    assert await limits.admit(a, "pro", rid(), at_ms=T0) is None
    assert await limits.admit(a, "pro", rid(), at_ms=T0) is not None  # a's burst is 1
    for _ in range(5):  # b is not affected by a
        assert await limits.admit(b, "pro", rid(), at_ms=T0) is None


async def test_lowest_lane_is_shed_first(redis: aioredis.Redis) -> None:
    # Pool of 10 tokens: free must leave 5, pro must leave 2, enterprise may take the last.
    limits = Limits(redis, fresh(capacity_per_s=1.0, capacity_burst=10.0, burst=100.0))
    admitted = {"free": 0, "pro": 0, "enterprise": 0}
    for lane in ("free", "pro", "enterprise"):
        while await limits.admit(tenant(), lane, rid(), at_ms=T0) is None:  # type: ignore[arg-type]
            admitted[lane] += 1
    assert admitted == {"free": 5, "pro": 3, "enterprise": 2}
    shed = await limits.admit(tenant(), "free", rid(), at_ms=T0)
    assert shed is not None and shed.status == "overloaded" and shed.kind == "shed"
    assert shed.retry_after_ms == 6000  # back above free's reserve of 5 at 1 token/s
    # Under the same load enterprise gets the next token first.
    assert await limits.admit(tenant(), "enterprise", rid(), at_ms=T0 + 1000) is None
    assert await limits.admit(tenant(), "pro", rid(), at_ms=T0 + 1000) is not None


async def test_a_refusal_costs_nothing(redis: aioredis.Redis) -> None:
    limits = Limits(redis, fresh(capacity_per_s=1.0, capacity_burst=2.0, burst=1.0))
    t = tenant()
    assert await limits.admit(t, "enterprise", rid(), at_ms=T0) is None
    # t is over its own rate: refused, and the pool keeps its token for someone else.
    assert await limits.admit(t, "enterprise", rid(), at_ms=T0) is not None
    assert await limits.admit(tenant(), "enterprise", rid(), at_ms=T0) is None


async def test_a_request_is_charged_once(redis: aioredis.Redis) -> None:
    # A redelivered or retried request must not pay again (nor be refused by its own token).
    limits = Limits(redis, fresh(rate_per_s=0.001, burst=1.0, budget_usd=0.01))
    t = tenant()
    for _ in range(3):
        assert await limits.admit(t, "pro", "same", at_ms=T0) is None
    assert await limits.admit(t, "pro", "another", at_ms=T0) is not None
    for _ in range(3):
        refusal, remaining = await limits.reserve(t, "same", 0.004, at_ms=T0)
        assert refusal is None and remaining == pytest.approx(0.006)
    assert await limits.spent(t, at_ms=T0) == pytest.approx(0.004)


async def test_budget_reserve_settle_and_period(redis: aioredis.Redis) -> None:
    t = tenant()
    limits = Limits(redis, fresh(budget_usd=0.01, budget_period_s=3600))
    at = T0 - T0 % 3_600_000 + 1_000  # one second into a period
    for rid in ("r1", "r2"):
        refusal, remaining = await limits.reserve(t, rid, 0.004, at_ms=at)
        assert refusal is None and remaining is not None
    assert remaining == pytest.approx(0.002)
    refusal, _ = await limits.reserve(t, "r3", 0.004, at_ms=at)
    assert refusal is not None and refusal.status == "over_budget" and refusal.kind == "cost_budget"
    assert refusal.retry_after_ms == 3_599_000  # until the next period
    # r1 actually cost less than reserved: its settle frees budget for r3.
    assert await limits.settle(t, "r1", 0.001)
    assert not await limits.settle(t, "r1", 0.001)  # once only
    assert await limits.spent(t, at_ms=at) == pytest.approx(0.005)
    refusal, _ = await limits.reserve(t, "r3", 0.004, at_ms=at)
    assert refusal is None
    # A new period starts empty.
    refusal, remaining = await limits.reserve(t, "r4", 0.004, at_ms=at + 3_600_000)
    assert refusal is None and remaining == pytest.approx(0.006)


async def test_unlimited_budget_and_unknown_settle(redis: aioredis.Redis) -> None:
    limits = Limits(redis, fresh())
    assert await limits.reserve(tenant(), "r", 100.0) == (None, None)
    assert not await limits.settle(tenant(), "never-reserved", 1.0)


def test_lane_is_capped_by_the_tenant_setting() -> None:
    cfg = RouteSettings(tenant_priority={"acme": "pro"}, max_priority="free")
    assert effective_lane("enterprise", "acme", cfg) == "pro"
    assert effective_lane("free", "acme", cfg) == "free"
    assert effective_lane("enterprise", "stranger", cfg) == "free"
    assert effective_lane("bogus", "acme", RouteSettings()) == "free"
