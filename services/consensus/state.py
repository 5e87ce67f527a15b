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

No read before a store: a candidate is judged against this process's last view of its
request (what its previous store returned; an empty state for a request it has not seen),
and the store is conditional on that view's version (ballot count and creation time): if
the state moved on (another instance, a restart, an expiry) nothing is stored and the
current state comes back from the same call, to judge again.  So a ballot costs one round
trip, a decision two (the ballot, the outcome), and a candidate arriving after the outcome
none when this process wrote or saw it (an outcome never changes).

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
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Final

import redis.asyncio as aioredis

from stratamesh.stores.keys import CONSENSUS

__all__ = ["DONE", "PREFIX", "SLOT_TAKEN", "STALE", "ConsensusState", "Snapshot", "request_key"]

PREFIX: Final = CONSENSUS

_ADD = """
if redis.call('HEXISTS', KEYS[1], 'outcome') == 1 then
  return {-1, redis.call('HGETALL', KEYS[1])}
end
local version = (redis.call('HGET', KEYS[1], 'seq') or '0') .. ':' ..
  (redis.call('HGET', KEYS[1], 'open') or '')
if ARGV[8] ~= '' and version ~= ARGV[8] then
  return {-3, redis.call('HGETALL', KEYS[1])}
end
if ARGV[1] ~= '' then
  local taken = redis.call('HGET', KEYS[1], 'slot:' .. ARGV[1])
  if taken then return {-2, redis.call('HGETALL', KEYS[1])} end
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

STALE: Final = -3
SLOT_TAKEN: Final = -2
DONE: Final = -1
_VIEWS: Final = 1024  # requests whose last state this process remembers


def request_key(namespace: str, tenant: str, request_id: str, revision_round: int) -> str:
    # The tenant's length keeps "a:b" + "c" apart from "a" + "b:c".
    return f"{PREFIX}req:{namespace}{revision_round}:{len(tenant)}:{tenant}:{request_id}"


@dataclass(slots=True)
class Snapshot:
    key: str
    seq: int = 0  # ballots stored so far
    policy: dict[str, str] | None = None
    open_ms: int | None = None
    close_ms: int | None = None
    ballots: dict[int, dict[str, Any]] = field(default_factory=dict)  # seq → ballot JSON
    outcome: dict[str, Any] | None = None

    @property
    def version(self) -> str:
        """What a ballot is stored against: the ballots so far and when the request's
        state was created (a state that expired and was created anew is another one)."""
        return f"{self.seq}:{'' if self.open_ms is None else self.open_ms}"

    @property
    def empty(self) -> bool:
        return not self.ballots and self.outcome is None


def _snapshot(key: str, fields: Iterable[tuple[Any, Any]]) -> Snapshot:
    snap = Snapshot(key)
    for k, v in fields:
        name = k.decode() if isinstance(k, bytes) else k
        if name.startswith("b:"):
            snap.ballots[int(name[2:])] = json.loads(v)
        elif name == "seq":
            snap.seq = int(v)
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
        self._views: OrderedDict[str, Snapshot] = OrderedDict()

    def view(self, key: str) -> Snapshot:
        """This process's last view of a request (what its last store or outcome returned),
        else an empty state (a new request): the state a ballot is judged against without
        a read.  Only a hint: :meth:`add` stores against its ``seq`` and answers
        :data:`STALE` with the actual state when it moved on (another instance, a restart,
        an expiry); an outcome, once seen, never changes."""
        found = self._views.get(key)
        if found is None:
            return Snapshot(key)
        self._views.move_to_end(key)
        return found

    def _remember(self, snap: Snapshot) -> Snapshot:
        if snap.outcome is not None:  # all a later candidate needs: the vote is over
            snap = Snapshot(snap.key, snap.seq, open_ms=snap.open_ms, outcome=snap.outcome)
        self._views[snap.key] = snap
        self._views.move_to_end(snap.key)
        while len(self._views) > _VIEWS:
            self._views.popitem(last=False)
        return snap

    def key(self, tenant: str, request_id: str, revision_round: int) -> str:
        return request_key(self.namespace, tenant, request_id, revision_round)

    async def load(self, key: str) -> Snapshot:
        raw = await self.redis.hgetall(key)
        return self._remember(_snapshot(key, raw.items()))

    async def add(
        self,
        key: str,
        ballot: dict[str, Any],
        *,
        slot: int | None,
        policy: dict[str, str] | None,
        open_ms: int,
        close_ms: int,
        expect: str | None = None,
    ) -> tuple[int, Snapshot]:
        """Store a ballot if the request's state is still at version ``expect`` (see
        :attr:`Snapshot.version`; None: whatever it is).  Returns its seq and the state just
        after it was stored (read in the same atomic step: no second round trip, and no
        other ballot in between), or :data:`DONE` and the state with its outcome, or
        :data:`STALE` (not at ``expect``) or :data:`SLOT_TAKEN` (the slot already voted)
        and the current state: nothing was stored."""
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
                "" if expect is None else expect,
            ],
        )
        return int(result[0]), self._remember(_snapshot(key, _pairs(result[1])))

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
        result: dict[str, Any] = outcome if int(written) == 1 else json.loads(stored)
        self._remember(Snapshot(key, outcome=result))
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
