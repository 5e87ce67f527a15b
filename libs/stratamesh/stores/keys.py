"""Every Redis key prefix stratamesh writes, in one place."""

from __future__ import annotations

from typing import Final

__all__ = [
    "CONSENSUS",
    "GUARD_REVIEWED",
    "IDEMPOTENCY",
    "PSEUDONYMS",
    "ROUTE_ADMITTED",
    "ROUTE_BUCKET",
    "ROUTE_BUDGET",
    "ROUTE_CACHE",
    "ROUTE_CITED",
    "ROUTE_DOC_VERSION",
    "ROUTE_LANES",
    "ROUTE_PENDING",
    "ROUTE_RESERVATION",
    "ROUTE_SEMANTIC",
]

# strata:idem:<consumer group>:<event id> → "1", with the idempotency TTL.
IDEMPOTENCY: Final = "strata:idem:"

# strata:pii:<tenant>:<pseudonym> → the original value, with GuardSettings.pseudonym_ttl_s.
# Written and read only by stratamesh.security.pseudonym (re-identification goes through it).
PSEUDONYMS: Final = "strata:pii:"

# route (services/route): limits, response caches and their invalidation index.
# strata:route:bucket:<tenant> → hash {tokens, ts}: the tenant's token bucket.
ROUTE_BUCKET: Final = "strata:route:bucket:"
# strata:route:admitted:<tenant>:<request id> → "1" for 15 min: admitted once, never charged twice.
ROUTE_ADMITTED: Final = "strata:route:admitted:"
# strata:route:lanes:<pool> → hash {tokens, ts}: the shared capacity the priority lanes draw on.
ROUTE_LANES: Final = "strata:route:lanes:"
# strata:route:budget:<tenant>:<period index> → USD spent + reserved in that period.
ROUTE_BUDGET: Final = "strata:route:budget:"
# strata:route:resv:<tenant>:<request id> → "<budget key> <USD reserved>" until the result.
ROUTE_RESERVATION: Final = "strata:route:resv:"
# strata:route:cache:<tenant>:<sha256> → JSON cached answer (exact-hash key).
ROUTE_CACHE: Final = "strata:route:cache:"
# strata:route:sem:<tenant>:<scope> → hash {cache digest → float32 query vector};
# strata:route:sem:<tenant>:<scope>:v → change counter (replicas reload their copy on change).
ROUTE_SEMANTIC: Final = "strata:route:sem:"
# strata:route:cited:<tenant>:<doc id> → set of "<doc version> <cache key>" citing it.
ROUTE_CITED: Final = "strata:route:cited:"
# strata:route:docv:<tenant>:<doc id> → newest indexed version seen (late fills check it).
ROUTE_DOC_VERSION: Final = "strata:route:docv:"
# strata:route:pending:<tenant>:<request id> → JSON of what to cache when the result comes.
ROUTE_PENDING: Final = "strata:route:pending:"

# consensus (services/consensus/state.py, which documents the layout under it): per-request
# ballots and outcome hashes, the window-close sorted set, escalation leases.
CONSENSUS: Final = "strata:consensus:"

# strata:guard:reviewed:<tenant>:<review event id> → id of the decision that completed it
# (services/guard/review.py): one final result per review, whoever decides second.
GUARD_REVIEWED: Final = "strata:guard:reviewed:"
