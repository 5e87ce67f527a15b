"""Tenant limits in Redis, each decision one atomic Lua script (safe across route replicas).

* **rate** — a token bucket per tenant (``rate_per_s``, ``burst``; per-tenant overrides) and
  a shared capacity pool the priority lanes draw on.  A lane may take a token only while the
  pool holds more than its reserve (``lane_reserve`` × burst): when load drains the pool,
  ``free`` is refused first, then ``pro``; ``enterprise`` may use the last token.  Both
  buckets are checked and charged together, so a refusal costs the tenant nothing.
* **budget** — USD per fixed period (``budget_usd`` per ``budget_period_s``).  Route reserves
  the estimated cost of the chosen tier when it routes; when the request's result arrives
  the reservation is replaced by the actual cost (:meth:`Limits.settle`).

Refusals are values (:class:`Refusal`), never exceptions: route turns them into an explicit
``results`` event with a retry-after.  Time is the caller's (``now_ms``): replicas on
machines with skewed clocks disagree by the skew only, and tests control it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

import redis.asyncio as aioredis

from stratamesh.config import RouteSettings
from stratamesh.stores.keys import (
    ROUTE_ADMITTED,
    ROUTE_BUCKET,
    ROUTE_BUDGET,
    ROUTE_LANES,
    ROUTE_RESERVATION,
)

__all__ = ["LANES", "Lane", "Limits", "Refusal", "effective_lane"]

Lane = Literal["enterprise", "pro", "free"]
LANES: Final[tuple[Lane, ...]] = ("enterprise", "pro", "free")  # highest first
# How long an admitted request is remembered (covers retries and a consumer's restart).
ADMITTED_TTL_MS: Final = 15 * 60 * 1000

# Token bucket refill, in one place for both buckets:
#   tokens = min(burst, tokens + (now - ts) * rate / 1000)
# Returns {code, retry_after_ms}: 0 admitted, 1 tenant bucket empty, 2 pool at the lane's
# reserve.  Nothing is written on a refusal except the refilled state.  KEYS[3] marks the
# request admitted: a redelivery or retry of the same request is admitted again for free.
_ADMIT: Final = """
if redis.call('EXISTS', KEYS[3]) == 1 then return {0, 0} end
local now = tonumber(ARGV[1])
local function refill(key, rate, burst)
  local s = redis.call('HMGET', key, 'tokens', 'ts')
  local tokens = tonumber(s[1])
  local ts = tonumber(s[2])
  if tokens == nil then tokens = burst; ts = now end
  if now > ts then tokens = math.min(burst, tokens + (now - ts) * rate / 1000) end
  return tokens
end
local t_rate, t_burst = tonumber(ARGV[2]), tonumber(ARGV[3])
local p_rate, p_burst, reserve = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local ttl = tonumber(ARGV[7])
local t = refill(KEYS[1], t_rate, t_burst)
local p = refill(KEYS[2], p_rate, p_burst)
local code, wait = 0, 0
if t < 1 then
  code = 1; wait = math.ceil((1 - t) * 1000 / t_rate)
elseif p - 1 < reserve then
  code = 2; wait = math.ceil((reserve + 1 - p) * 1000 / p_rate)
else
  t = t - 1; p = p - 1
  redis.call('SET', KEYS[3], '1', 'PX', tonumber(ARGV[8]))
end
redis.call('HSET', KEYS[1], 'tokens', tostring(t), 'ts', tostring(now))
redis.call('HSET', KEYS[2], 'tokens', tostring(p), 'ts', tostring(now))
redis.call('PEXPIRE', KEYS[1], ttl)
redis.call('PEXPIRE', KEYS[2], ttl)
return {code, wait}
"""

# Reserve ARGV[2] USD of the period budget ARGV[1]; the reservation (KEYS[2]) remembers
# how much, for settle.  Returns {ok, spent-after-as-string}.  A request that already holds
# a reservation (redelivery, retry) is not charged twice.
_RESERVE: Final = """
local budget, amount = tonumber(ARGV[1]), tonumber(ARGV[2])
local spent = tonumber(redis.call('GET', KEYS[1]) or '0')
if redis.call('EXISTS', KEYS[2]) == 1 then return {1, tostring(spent)} end
if spent + amount > budget then return {0, tostring(spent)} end
spent = redis.call('INCRBYFLOAT', KEYS[1], ARGV[2])
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[3]))
redis.call('SET', KEYS[2], KEYS[1] .. ' ' .. ARGV[2], 'EX', tonumber(ARGV[4]))
return {1, tostring(spent)}
"""

# Replace a reservation by the actual cost ARGV[1] (once: the reservation is deleted).
# Without a reservation nothing is charged: only what route admitted counts here.
_SETTLE: Final = """
local r = redis.call('GET', KEYS[1])
if not r then return 0 end
redis.call('DEL', KEYS[1])
local sep = string.find(r, ' ', 1, true)
local key, reserved = string.sub(r, 1, sep - 1), tonumber(string.sub(r, sep + 1))
local delta = tonumber(ARGV[1]) - reserved
if delta ~= 0 and redis.call('EXISTS', key) == 1 then
  redis.call('INCRBYFLOAT', key, tostring(delta))
end
return 1
"""


@dataclass(frozen=True, slots=True)
class Refusal:
    status: Literal["over_budget", "overloaded"]
    reason: str
    retry_after_ms: int
    kind: Literal["rate_limit", "cost_budget", "shed"]


def effective_lane(requested: str, tenant: str, settings: RouteSettings) -> Lane:
    """The payload's priority, capped by the tenant's configured lane (a client cannot
    promote itself above what its tenant is allowed)."""
    cap = settings.tenant_priority.get(tenant, settings.max_priority)
    req: Lane = next((lane for lane in LANES if lane == requested), "free")
    return LANES[max(LANES.index(req), LANES.index(cap))]


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class Limits:
    def __init__(self, redis: aioredis.Redis, settings: RouteSettings) -> None:
        self.redis = redis
        self.settings = settings
        self._admit: Any = redis.register_script(_ADMIT)
        self._reserve: Any = redis.register_script(_RESERVE)
        self._settle: Any = redis.register_script(_SETTLE)

    def rate_of(self, tenant: str) -> tuple[float, float]:
        s = self.settings
        return s.tenant_rates.get(tenant, (s.rate_per_s, s.burst))

    def budget_of(self, tenant: str) -> float | None:
        return self.settings.tenant_budgets.get(tenant, self.settings.budget_usd)

    async def admit(
        self, tenant: str, lane: Lane, request_id: str, *, at_ms: int | None = None
    ) -> Refusal | None:
        """Take one token of the tenant's bucket and of the shared pool, or refuse.  Once
        admitted, the same request is admitted again without a token (redeliveries)."""
        [out] = await self.admit_many([(tenant, lane, request_id)], at_ms=at_ms)
        return out

    async def admit_many(
        self, requests: Sequence[tuple[str, Lane, str]], *, at_ms: int | None = None
    ) -> list[Refusal | None]:
        """:meth:`admit` for ``(tenant, lane, request id)`` in order, in one round trip
        (each decision is still its own atomic script)."""
        if not requests:
            return []
        s = self.settings
        at = at_ms if at_ms is not None else now_ms()
        pipe = self.redis.pipeline(transaction=False)
        for tenant, lane, request_id in requests:
            rate, burst = self.rate_of(tenant)
            # Keys live long enough to refill completely, then vanish (a full bucket).
            ttl_ms = int(1000 * max(burst / rate, s.capacity_burst / s.capacity_per_s)) + 60_000
            await self._admit(
                keys=[
                    ROUTE_BUCKET + tenant,
                    ROUTE_LANES + s.capacity_pool,
                    f"{ROUTE_ADMITTED}{tenant}:{request_id}",
                ],
                args=[
                    at,
                    rate,
                    burst,
                    s.capacity_per_s,
                    s.capacity_burst,
                    s.lane_reserve.get(lane, 0.0) * s.capacity_burst,
                    ttl_ms,
                    ADMITTED_TTL_MS,
                ],
                client=pipe,
            )
        replies = await pipe.execute()
        return [
            self._refusal(code, wait, tenant, lane)
            for (code, wait), (tenant, lane, _) in zip(replies, requests, strict=True)
        ]

    def _refusal(self, code: Any, wait: Any, tenant: str, lane: Lane) -> Refusal | None:
        if int(code) == 1:
            rate, burst = self.rate_of(tenant)
            return Refusal(
                "over_budget",
                f"rate limit: tenant allows {rate:g} requests/s (burst {burst:g})",
                int(wait),
                "rate_limit",
            )
        if int(code) == 2:
            return Refusal(
                "overloaded",
                f"overloaded: lane {lane} shed to keep capacity for higher lanes",
                int(wait),
                "shed",
            )
        return None

    def _period(self, at_ms: int) -> tuple[int, int]:
        """(period index, ms until the next period starts)."""
        length = self.settings.budget_period_s * 1000
        return at_ms // length, length - at_ms % length

    async def reserve(
        self, tenant: str, request_id: str, amount_usd: float, *, at_ms: int | None = None
    ) -> tuple[Refusal | None, float | None]:
        """Reserve ``amount_usd`` of the tenant's period budget: (refusal, remaining USD)."""
        budget = self.budget_of(tenant)
        if budget is None:
            return None, None
        at = at_ms if at_ms is not None else now_ms()
        period, left_ms = self._period(at)
        key = f"{ROUTE_BUDGET}{tenant}:{period}"
        ok, spent = await self._reserve(
            keys=[key, f"{ROUTE_RESERVATION}{tenant}:{request_id}"],
            args=[
                repr(budget),
                repr(max(0.0, amount_usd)),
                2 * self.settings.budget_period_s,
                self.settings.budget_period_s + 3600,
            ],
        )
        remaining = max(0.0, budget - float(spent))
        if int(ok) == 1:
            return None, remaining
        return (
            Refusal(
                "over_budget",
                f"cost budget: tenant spent {float(spent):.4f} of {budget:g} USD this period",
                int(left_ms),
                "cost_budget",
            ),
            remaining,
        )

    async def settle(self, tenant: str, request_id: str, actual_usd: float) -> bool:
        """Replace the request's reservation by its actual cost; False if none was held."""
        done = await self._settle(
            keys=[f"{ROUTE_RESERVATION}{tenant}:{request_id}"], args=[repr(max(0.0, actual_usd))]
        )
        return bool(int(done))

    async def spent(self, tenant: str, *, at_ms: int | None = None) -> float:
        period, _ = self._period(at_ms if at_ms is not None else now_ms())
        raw = await self.redis.get(f"{ROUTE_BUDGET}{tenant}:{period}")
        return float(raw) if raw is not None else 0.0
