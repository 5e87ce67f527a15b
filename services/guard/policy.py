"""Guard policy: size limits (settings) and per-tenant rules (a JSON policy file).

The packaged ``policy.json`` holds a ``default`` tenant policy and per-tenant overrides under
``tenants`` (each override is merged over the default, key by key); ``STRATA_GUARD__POLICY_FILE``
points at another file of the same shape::

    {"default": {"allowed_tasks": ["qa", "chat", "summarise", "extract"],
                 "reidentify_answers": false,      # re-identify pseudonyms in answers
                 "citations": "flag",              # flag | strip | block invented citations
                 "escalate": {"unsafe_score": 0.9, "faithfulness_below": 0.3,
                              "citation_score_below": 0.5}},
     "tenants": {"acme": {"allowed_tasks": ["qa"], "reidentify_answers": true}}}
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from stratamesh.config import GuardSettings
from stratamesh.errors import ConfigError
from stratamesh.events import InferenceRequested

__all__ = ["CitationPolicy", "Escalation", "GuardPolicy", "TenantPolicy", "Violation"]

CitationPolicy = Literal["flag", "strip", "block"]


@dataclass(frozen=True, slots=True)
class Escalation:
    """Hard thresholds past which a human reviews the request (reviews.pending)."""

    unsafe_score: float = 0.9
    faithfulness_below: float = 0.3
    citation_score_below: float = 0.5


@dataclass(frozen=True, slots=True)
class TenantPolicy:
    allowed_tasks: frozenset[str]
    reidentify_answers: bool = False
    citations: CitationPolicy = "flag"
    escalate: Escalation = Escalation()

    @classmethod
    def parse(cls, raw: dict[str, Any]) -> TenantPolicy:
        citations = raw.get("citations", "flag")
        if citations not in ("flag", "strip", "block"):
            raise ConfigError(
                f"guard policy: citations must be flag|strip|block, not {citations!r}"
            )
        return cls(
            allowed_tasks=frozenset(raw.get("allowed_tasks", ())),
            reidentify_answers=bool(raw.get("reidentify_answers", False)),
            citations=citations,
            escalate=Escalation(**raw.get("escalate", {})),
        )


@dataclass(frozen=True, slots=True)
class Violation:
    """A broken rule: ``code`` is machine-readable, ``reason`` safe to show (no content)."""

    code: str
    reason: str


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


class GuardPolicy:
    def __init__(self, settings: GuardSettings, raw: dict[str, Any]) -> None:
        self.settings = settings
        try:
            default_raw = raw["default"]
            self.default = TenantPolicy.parse(default_raw)
            self.tenants = {
                name: TenantPolicy.parse(_merge(default_raw, over))
                for name, over in raw.get("tenants", {}).items()
            }
        except (KeyError, TypeError) as exc:
            raise ConfigError(f"guard policy is malformed: {exc}") from exc

    @classmethod
    def load(cls, settings: GuardSettings) -> GuardPolicy:
        if settings.policy_file is not None:
            text = Path(settings.policy_file).read_text("utf-8")
        else:
            text = resources.files(__package__).joinpath("policy.json").read_text("utf-8")
        return cls(settings, json.loads(text))

    def for_tenant(self, tenant: str) -> TenantPolicy:
        return self.tenants.get(tenant, self.default)

    def check(self, event: InferenceRequested, tenant: str) -> list[Violation]:
        """Size limits and the tenant's allowed tasks (cheap: runs before any scanner)."""
        s = self.settings
        out: list[Violation] = []
        if len(event.prompt) > s.max_prompt_chars:
            out.append(
                Violation("prompt_too_long", f"prompt longer than {s.max_prompt_chars} characters")
            )
        if len(event.messages) > s.max_messages:
            out.append(Violation("too_many_messages", f"more than {s.max_messages} messages"))
        total = len(event.prompt) + sum(len(m.content) for m in event.messages)
        if total > s.max_total_chars:
            out.append(
                Violation(
                    "request_too_long", f"prompt and messages exceed {s.max_total_chars} characters"
                )
            )
        if not event.prompt.strip() and not any(m.content.strip() for m in event.messages):
            out.append(Violation("empty", "the request has no prompt and no messages"))
        policy = self.for_tenant(tenant)
        if event.task not in policy.allowed_tasks:
            out.append(
                Violation(
                    "task_not_allowed", f"task {event.task[:40]!r} is not allowed for this tenant"
                )
            )
        return out
