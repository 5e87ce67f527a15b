"""Revision rounds (evaluator-optimizer) on the routing slip.

A slip with a judge stage reads e.g. ``[retrieve, infer, consensus, judge, guard_out]``.
An answer below the thresholds, with rounds left, goes back as an ``AnswerJudged``
(``passed=false`` + critique) whose slip is the *same* list with ``current`` moved back to
the infer stage before judge (``strata-next = infer``).  infer regenerates with the critique
and advances the slip as always, so the new answer (``revision_round`` + 1) passes consensus
again when the slip has it and comes back to judge — no new stages, no schema change.
At the cap, judge publishes the last answer's scores along the slip (guard_out), ``passed``
false when it still falls short, and guard decides (flag, or human review).

The cap is ``min(JudgePolicy.max_revisions, STRATA_JUDGE__MAX_REVISIONS)``; every
AnswerJudged records ``versions["judge.revisions"] = "<round>/<cap>"``.
"""

from __future__ import annotations

from typing import Final

from stratamesh.bus.topics import Stage
from stratamesh.events import JudgePolicy, RoutingSlip

__all__ = ["MAX_CRITIQUE_LINES", "cap_of", "critique_of", "rewound"]

MAX_CRITIQUE_LINES: Final = 6  # a small model follows a short list, not an essay


def cap_of(policy: JudgePolicy, hard_cap: int) -> int:
    return max(0, min(int(policy.max_revisions), hard_cap))


def rewound(slip: RoutingSlip) -> RoutingSlip | None:
    """The slip addressed to the last infer stage before the current one; None if none."""
    for i in range(min(slip.current, len(slip.stages)) - 1, -1, -1):
        if slip.stages[i].stage == Stage.INFER:
            return slip.model_copy(update={"current": i})
    return None


def critique_of(problems: list[str]) -> str:
    lines = list(dict.fromkeys(problems))
    shown = lines[:MAX_CRITIQUE_LINES]
    more = len(lines) - len(shown)
    text = "\n".join(f"- {p}" for p in shown)
    return text + (f"\n- ... and {more} more." if more > 0 else "")
