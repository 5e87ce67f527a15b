"""Per-request aggregation state in Redis: what makes consensus crash-safe.

Why Redis rather than holding offsets back: the runtime commits a partition's offsets as
soon as each record's outputs are acknowledged (runtime.py), record by record; holding a
partition's commits at its oldest undecided request would need a hook into that tracker,
and one slow request (a silent replica waiting out its window) would pin every later
request on the partition, so a restart would re-handle minutes of traffic.  With the
ballots in Redis, each candidate record is done when its ballot is stored: a candidate is
committed as usual, a restarted instance (or the partition's next owner) finds the ballots
where the dead one left them, and window deadlines survive in a sorted set that any
instance sweeps.

Layout (prefix :data:`PREFIX`; ``<ns>`` is ``shadow.`` for a shadow pipeline)::

    strata:consensus:req:<ns><round>:<len(tenant)>:<tenant>:<request id>   hash, TTL
        policy      JSON {"mode", "replicas", "f"}: pinned by the first valid ballot
        open close  window, epoch ms
        seq         ballots so far
        slot:<k>    seq of replica slot k's first ballot (HSETNX: one vote per slot)
        b:<seq>     JSON ballot (its candidate included, for the decision and reviewers)
        outcome     JSON {"trigger", "kind", "events": [...]}: set once (HSETNX)
    strata:consensus:due:<ns>          sorted set: request key → window close (ms)
    strata:consensus:lease:<request key>   the instance escalating it (SET NX PX)

Exactly one outcome per request: it is written once, with the event ids fixed by the
request (not by the record that triggered it), before anything is published.  Whoever
wrote it (the handler of candidate *x*, or the sweeper as ``timer``) is its ``trigger``
and publishes it; if it dies before its output is acknowledged, the redelivered candidate
*x* (its offset was never committed) — or the sweeper, for ``timer``, which removes a
request from ``due`` only after the broker acknowledged — publishes the stored events
again: the same bytes and ids, which consumers' idempotency drops.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Final

import redis.asyncio as aioredis

from stratamesh.stores.keys import CONSENSUS

__all__ = ["PREFIX", "ConsensusState", "Snapshot", "request_key"]

PREFIX: Final = CONSENSUS

_ADD = """
if redis.call('HEXISTS', KEYS[1], 'outcome') == 1 then
  return {-1, redis.call('HGETALL', KEYS[1])}
end
if ARGV[1] ~= '' then
  local taken = redis.call('HGET', KEYS[1], 'slot:' .. ARGV[1])
  if taken then return {-2, {}} end
end
if ARGV[3] ~= '' then redis.call('HSETNX', KEYS[1], 'policy', ARGV[3]) end
if redis.call('HSETNX', KEYS[1], 'open', ARGV[4]) == 1 then
  redis.call('HSET', KEYS[1], 'close', ARGV[5])
  redis.call('ZADD', KEYS[2], 'NX', ARGV[5], ARGV[7])
end
local seq = redis.call('HINCRBY', KEYS[1], 'seq', 1)
if ARGV[1] ~= '' then redis.call('HSET', KEYS[1], 'slot:' .. ARGV[1], seq) end
redis.call('HSET', KEYS[1], 'b:' .. seq, ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[6])
return {seq, redis.call('HGETALL', KEYS[1])}
"""

_FINAL = """
if redis.call('HSETNX', KEYS[1], 'outcome', ARGV[1]) == 1 then
  redis.call('EXPIRE', KEYS[1], ARGV[3])
  if ARGV[4] == '1' then redis.call('ZREM', KEYS[2], ARGV[2]) end
  return {1, ''}
end
return {0, redis.call('HGET', KEYS[1], 'outcome')}
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

SLOT_TAKEN: Final = -2
DONE: Final = -1


def request_key(namespace: str, tenant: str, request_id: str, revision_round: int) -> str:
    # The tenant's length keeps "a:b" + "c" apart from "a" + "b:c".
    return f"{PREFIX}req:{namespace}{revision_round}:{len(tenant)}:{tenant}:{request_id}"


@dataclass(slots=True)
class Snapshot:
    key: str
    policy: dict[str, str] | None = None
    open_ms: int | None = None
    close_ms: int | None = None
    ballots: dict[int, dict[str, Any]] = field(default_factory=dict)  # seq → ballot JSON
    outcome: dict[str, Any] | None = None

    @property
    def empty(self) -> bool:
        return not self.ballots and self.outcome is None


def _snapshot(key: str, fields: Iterable[tuple[Any, Any]]) -> Snapshot:
    snap = Snapshot(key)
    for k, v in fields:
        name = k.decode() if isinstance(k, bytes) else k
        if name.startswith("b:"):
            snap.ballots[int(name[2:])] = json.loads(v)
        elif name == "policy":
            snap.policy = json.loads(v)
        elif name == "open":
            snap.open_ms = int(v)
        elif name == "close":
            snap.close_ms = int(v)
        elif name == "outcome":
            snap.outcome = json.loads(v)
    return snap


def _pairs(flat: list[Any]) -> Iterator[tuple[Any, Any]]:
    """HGETALL's reply inside a script: a flat list, field then value."""
    it = iter(flat)
    return zip(it, it, strict=True)


class ConsensusState:
    def __init__(self, redis: aioredis.Redis, *, namespace: str = "", ttl_s: int = 86_400) -> None:
        self.redis = redis
        self.namespace = namespace
        self.ttl_s = ttl_s
        self.due_key = f"{PREFIX}due:{namespace}"
        self._add = redis.register_script(_ADD)
        self._final = redis.register_script(_FINAL)
        self._release = redis.register_script(_RELEASE)

    def key(self, tenant: str, request_id: str, revision_round: int) -> str:
        return request_key(self.namespace, tenant, request_id, revision_round)

    async def load(self, key: str) -> Snapshot:
        raw = await self.redis.hgetall(key)
        return _snapshot(key, raw.items())

    async def add(
        self,
        key: str,
        ballot: dict[str, Any],
        *,
        slot: int | None,
        policy: dict[str, str] | None,
        open_ms: int,
        close_ms: int,
    ) -> tuple[int, Snapshot | None]:
        """Store a ballot: its seq and the request's state just after it was stored (read
        in the same atomic step: no second round trip, and no other ballot in between), or
        :data:`DONE` and the state with its outcome, or :data:`SLOT_TAKEN` and None (the
        slot already voted)."""
        result = await self._add(
            keys=[key, self.due_key],
            args=[
                "" if slot is None else str(slot),
                json.dumps(ballot, separators=(",", ":")),
                json.dumps(policy, sort_keys=True) if policy is not None else "",
                str(open_ms),
                str(close_ms),
                str(self.ttl_s),
                key,
            ],
        )
        seq = int(result[0])
        return seq, (None if seq == SLOT_TAKEN else _snapshot(key, _pairs(result[1])))

    async def finalise(
        self, key: str, outcome: dict[str, Any], *, settled: bool = True
    ) -> dict[str, Any]:
        """Write ``outcome`` unless one exists; the stored one either way (``outcome``
        itself when it was written now: it is not sent back).  ``settled`` also removes the
        request from the due set (the sweeper does that itself, after the broker
        acknowledged)."""
        written, stored = await self._final(
            keys=[key, self.due_key],
            args=[
                json.dumps(outcome, separators=(",", ":")),
                key,
                str(self.ttl_s),
                "1" if settled else "0",
            ],
        )
        if int(written) == 1:
            return outcome
        result: dict[str, Any] = json.loads(stored)
        return result

    async def due(self, now_ms: int, limit: int = 100) -> list[str]:
        keys = await self.redis.zrangebyscore(self.due_key, "-inf", now_ms, start=0, num=limit)
        return [k.decode() if isinstance(k, bytes) else str(k) for k in keys]

    async def claim(self, key: str, owner: str, lease_ms: int) -> bool:
        return bool(await self.redis.set(f"{PREFIX}lease:{key}", owner, nx=True, px=lease_ms))

    async def release(self, key: str, owner: str) -> None:
        await self._release(keys=[f"{PREFIX}lease:{key}"], args=[owner])

    async def settle(self, key: str) -> None:
        await self.redis.zrem(self.due_key, key)
