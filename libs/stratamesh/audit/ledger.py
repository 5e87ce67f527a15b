"""The cost ledger: tokens and cost per tenant, model and request, from the audit records.

A cost is booked once, where it is incurred (``billed = 1``: each CandidateAnswer, i.e.
each model call of each replica and revision round; see ``services/audit/records.py``).
Replayed events are audited with ``billed = 0``; the summary counts them separately so a
replay's cost is visible without being charged.  Because the ledger *is* the chained audit
records, ``strata audit verify`` covers it: an edited token count is a broken chain.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import sqlalchemy as sa

from stratamesh.audit.schema import records
from stratamesh.audit.store import AuditStore

__all__ = ["GROUPS", "CostLine", "CostReport", "Group", "cost_report"]

Group = Literal["tenant", "model", "request"]
GROUPS: Final[tuple[Group, ...]] = ("tenant", "model", "request")
_COLUMN: Final = {
    "tenant": records.c.tenant,
    "model": records.c.model,
    "request": records.c.request_id,
}


@dataclass(frozen=True, slots=True)
class CostLine:
    group: dict[str, str]
    calls: int
    input_tokens: int
    output_tokens: int
    cost_usd: float

    def as_dict(self) -> dict[str, Any]:
        return {
            **self.group,
            "calls": self.calls,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "cost_usd": self.cost_usd,
        }


@dataclass(slots=True)
class CostReport:
    by: tuple[Group, ...]
    lines: list[CostLine] = field(default_factory=list)
    # Model calls of replayed events in the same window: audited, not billed.
    replayed_calls: int = 0
    replayed_cost_usd: float = 0.0

    @property
    def total(self) -> CostLine:
        return CostLine(
            {},
            sum(x.calls for x in self.lines),
            sum(x.input_tokens for x in self.lines),
            sum(x.output_tokens for x in self.lines),
            sum(x.cost_usd for x in self.lines),
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "by": list(self.by),
            "lines": [x.as_dict() for x in self.lines],
            "total": self.total.as_dict(),
            "not_billed": {
                "replayed_calls": self.replayed_calls,
                "replayed_cost_usd": self.replayed_cost_usd,
            },
        }


async def cost_report(
    store: AuditStore,
    *,
    by: Sequence[Group] = ("tenant", "model"),
    tenant: str | None = None,
    model: str | None = None,
    request_id: str | None = None,
    since_ms: int | None = None,
    until_ms: int | None = None,
) -> CostReport:
    """Billed tokens and cost grouped by ``by``, filtered; ``since``/``until`` bound the
    events' own time (occurred_at, epoch ms, ``until`` exclusive)."""
    groups = tuple(dict.fromkeys(by)) or ("tenant",)
    cols = [_COLUMN[g].label(g) for g in groups]
    where: list[sa.ColumnElement[bool]] = [records.c.status == "ok"]
    if tenant is not None:
        where.append(records.c.tenant == tenant)
    if model is not None:
        where.append(records.c.model == model)
    if request_id is not None:
        where.append(records.c.request_id == request_id)
    if since_ms is not None:
        where.append(records.c.occurred_ms >= since_ms)
    if until_ms is not None:
        where.append(records.c.occurred_ms < until_ms)
    sums = [
        sa.func.count().label("calls"),
        sa.func.coalesce(sa.func.sum(records.c.input_tokens), 0),
        sa.func.coalesce(sa.func.sum(records.c.output_tokens), 0),
        sa.func.coalesce(sa.func.sum(records.c.cost_usd), 0.0),
    ]
    billed = (
        sa.select(*cols, *sums)
        .where(records.c.billed == 1, *where)
        .group_by(*cols)
        .order_by(sa.func.sum(records.c.cost_usd).desc(), *cols)
    )
    replayed = sa.select(sums[0], sums[3]).where(
        records.c.billed == 0,
        records.c.replay != "",
        records.c.event_type == "CandidateAnswer",
        *where,
    )
    report = CostReport(groups)
    async with store.engine.connect() as conn:
        for row in await conn.execute(billed):
            n = len(groups)
            report.lines.append(
                CostLine(
                    {g: str(row[i]) for i, g in enumerate(groups)},
                    int(row[n]),
                    int(row[n + 1]),
                    int(row[n + 2]),
                    float(row[n + 3]),
                )
            )
        calls, usd = (await conn.execute(replayed)).one()
        report.replayed_calls, report.replayed_cost_usd = int(calls), float(usd)
    return report
