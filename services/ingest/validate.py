"""Validation of submitted documents, with a reason and a hint for every refusal.

:func:`validate` checks a :class:`~stratamesh.events.DocumentSubmitted` (under the
authenticated tenant) with the pydantic model :class:`Submission`.  Every rule raises a
``PydanticCustomError`` whose *type* is the rejection code and whose context carries the
hint (and the field, for rules over several fields); :func:`validate` turns the first
error into a :class:`Rejection` (code, field, reason, hint) — invalid input is a result,
never an exception that reaches the consumer.

Rejection codes (``DocumentRejected.code``):

=================  ====================================================================
``invalid``        a field breaks a rule (empty id, version < 1, bad ACL entry, ...)
``empty``          no text to index (blank content, or markup without text)
``too_large``      content or metadata above the limits below
``undecodable``    binary content (NUL bytes, many replacement characters), broken HTML
``unsupported``    an unknown chunk profile
``expired``        a fluid document whose ``expires_at`` is not after ``occurred_at``
``version_required``  an anchored document without ``doc_version`` (when required)
=================  ====================================================================

The decision of :mod:`.versions` adds ``unchanged``, ``version_conflict`` and
``stale_version``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, timedelta
from typing import Any, Final

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from stratamesh.events import ContentType, DocumentSubmitted, KnowledgeClass

__all__ = [
    "Policy",
    "Rejection",
    "Submission",
    "validate",
]

# Limits (module constants until they become settings).
MAX_CONTENT_BYTES: Final = 5 * 1024 * 1024  # UTF-8 bytes of `content`
MAX_DOC_ID_CHARS: Final = 512
MAX_TITLE_CHARS: Final = 2_048
MAX_ACL_ENTRIES: Final = 256
MAX_METADATA_ENTRIES: Final = 128
MAX_METADATA_CHARS: Final = 16_384  # keys and values together: every chunk carries a copy
# An anchored document must name its version (else ingest numbers versions 1, 2, ...).
REQUIRE_ANCHORED_VERSION: Final = False
# A fluid document submitted without an expiry expires this long after it was submitted.
DEFAULT_FLUID_TTL: Final = timedelta(days=30)
# Binary or mis-decoded content: NUL bytes, or more than this share of U+FFFD / controls.
MAX_GARBAGE_RATIO: Final = 0.02


@dataclass(frozen=True, slots=True)
class Policy:
    max_content_bytes: int = MAX_CONTENT_BYTES
    require_anchored_version: bool = REQUIRE_ANCHORED_VERSION
    default_fluid_ttl: timedelta = DEFAULT_FLUID_TTL


@dataclass(frozen=True, slots=True)
class Rejection:
    code: str
    reason: str
    field: str | None = None
    hint: str | None = None


def _err(code: str, message: str, hint: str, field: str | None = None) -> PydanticCustomError:
    ctx: dict[str, Any] = {"hint": hint}
    if field is not None:
        ctx["field"] = field
    # Braces in user text would be read as template fields: escape them.
    return PydanticCustomError(code, message.replace("{", "{{").replace("}", "}}"), ctx)


_GARBAGE: Final = re.compile("[\ufffd\x00-\x08\x0b\x0c\x0e-\x1f]")


def _garbage_ratio(text: str) -> float:
    return len(_GARBAGE.findall(text)) / max(1, len(text))


class Submission(BaseModel):
    """A document that passed validation, with its knowledge class and expiry resolved."""

    model_config = ConfigDict(frozen=True)

    tenant: str
    doc_id: str
    doc_version: int | None
    title: str
    content: str
    content_type: ContentType
    knowledge_class: KnowledgeClass
    expires_at: AwareDatetime | None  # resolved: a fluid document always has one
    requested_expires_at: AwareDatetime | None  # as submitted (part of the fingerprint)
    occurred_at: AwareDatetime
    acl: list[str]
    metadata: dict[str, str]
    chunk_profile: str | None
    source_uri: str | None

    @field_validator("tenant")
    @classmethod
    def _tenant(cls, v: str) -> str:
        if not v:
            raise _err(
                "invalid",
                "the document has no tenant",
                "publish with a client key registered to a tenant (strata keys gen --client "
                "NAME --tenant T)",
            )
        return v

    @field_validator("doc_id")
    @classmethod
    def _doc_id(cls, v: str) -> str:
        if not v.strip():
            raise _err("invalid", "doc_id is empty", "give every document a stable id")
        if len(v) > MAX_DOC_ID_CHARS:
            raise _err(
                "invalid",
                f"doc_id has {len(v)} characters (at most {MAX_DOC_ID_CHARS})",
                "use a shorter id, e.g. a path relative to the corpus root or a hash",
            )
        if any(ch < " " or ch == "\x7f" for ch in v):
            raise _err("invalid", "doc_id contains control characters", "use printable characters")
        return v

    @field_validator("doc_version")
    @classmethod
    def _doc_version(cls, v: int | None) -> int | None:
        if v is not None and v < 1:
            raise _err(
                "invalid",
                f"doc_version must be ≥ 1, got {v}",
                "versions count from 1; leave doc_version empty to let ingest number them",
            )
        return v

    @field_validator("title")
    @classmethod
    def _title(cls, v: str) -> str:
        if len(v) > MAX_TITLE_CHARS:
            raise _err(
                "invalid",
                f"title has {len(v)} characters (at most {MAX_TITLE_CHARS})",
                "put long text in content, not in the title",
            )
        return v

    @field_validator("content")
    @classmethod
    def _content(cls, v: str, info: ValidationInfo) -> str:
        policy: Policy = (info.context or {}).get("policy", Policy())
        size = len(v.encode("utf-8", "surrogatepass"))
        if size > policy.max_content_bytes:
            raise _err(
                "too_large",
                f"content is {size / 1e6:.1f} MB (at most {policy.max_content_bytes / 1e6:.1f} MB)",
                "split the document into several documents (e.g. one per chapter)",
            )
        if not v.strip():
            raise _err("empty", "content is empty", "submit the document's text")
        if "\x00" in v or _garbage_ratio(v) > MAX_GARBAGE_RATIO:
            raise _err(
                "undecodable",
                "content looks binary or wrongly decoded (NUL bytes or many replacement "
                "characters)",
                "send UTF-8 text; convert PDFs, Office files and images to text first",
            )
        return v

    @field_validator("acl")
    @classmethod
    def _acl(cls, v: list[str]) -> list[str]:
        if len(v) > MAX_ACL_ENTRIES:
            raise _err(
                "too_large",
                f"acl has {len(v)} entries (at most {MAX_ACL_ENTRIES})",
                "grant access to groups rather than to many single principals",
            )
        if any(not p.strip() for p in v):
            raise _err(
                "invalid",
                "acl contains an empty principal",
                "list principal names, or leave acl empty for the whole tenant",
            )
        return v

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, v: dict[str, str]) -> dict[str, str]:
        size = sum(len(k) + len(x) for k, x in v.items())
        if len(v) > MAX_METADATA_ENTRIES or size > MAX_METADATA_CHARS:
            raise _err(
                "too_large",
                f"metadata has {len(v)} entries and {size} characters (at most "
                f"{MAX_METADATA_ENTRIES} entries, {MAX_METADATA_CHARS} characters)",
                "keep metadata to short filterable fields; every chunk carries a copy",
            )
        if any(not k.strip() for k in v):
            raise _err("invalid", "metadata has an empty key", "name every metadata field")
        return v

    @field_validator("chunk_profile")
    @classmethod
    def _chunk_profile(cls, v: str | None, info: ValidationInfo) -> str | None:
        known: list[str] | None = (info.context or {}).get("profiles")
        if v is not None and known is not None and v not in known:
            raise _err(
                "unsupported",
                f"unknown chunk profile {v!r}",
                f"use one of: {', '.join(known)} (or leave chunk_profile empty)",
            )
        return v

    @model_validator(mode="after")
    def _lifecycle(self, info: ValidationInfo) -> Submission:
        policy: Policy = (info.context or {}).get("policy", Policy())
        if self.knowledge_class == KnowledgeClass.FLUID:
            if self.expires_at is not None and self.expires_at <= self.occurred_at:
                raise _err(
                    "expired",
                    f"expires_at {self.expires_at.isoformat()} is not after the submission "
                    f"time {self.occurred_at.isoformat()}",
                    "give a future expires_at, or submit the document as anchored",
                    "expires_at",
                )
        elif self.doc_version is None and policy.require_anchored_version:
            raise _err(
                "version_required",
                "an anchored document must name its version",
                "set doc_version (1, 2, ...) on anchored documents",
                "doc_version",
            )
        return self


def _classify(event: DocumentSubmitted) -> KnowledgeClass:
    """The knowledge class when the submitter gave none: an expiry means fluid knowledge,
    everything else is anchored (versioned, superseded by newer versions)."""
    if event.knowledge_class is not None:
        return event.knowledge_class
    return KnowledgeClass.FLUID if event.expires_at is not None else KnowledgeClass.ANCHORED


def validate(
    event: DocumentSubmitted, *, tenant: str, policy: Policy, profiles: list[str]
) -> Submission | Rejection:
    """The validated submission, or why it is refused (the first problem; the others are
    listed in the reason)."""
    knowledge_class = _classify(event)
    expires_at = event.expires_at
    if knowledge_class == KnowledgeClass.FLUID and expires_at is None:
        expires_at = event.occurred_at + policy.default_fluid_ttl
    data = {
        "tenant": tenant,
        "doc_id": event.doc_id,
        "doc_version": event.doc_version,
        "title": event.title,
        "content": event.content,
        "content_type": event.content_type,
        "knowledge_class": knowledge_class,
        "expires_at": expires_at,
        "requested_expires_at": event.expires_at,
        "occurred_at": event.occurred_at.astimezone(UTC)
        if event.occurred_at.tzinfo
        else event.occurred_at.replace(tzinfo=UTC),
        "acl": list(event.acl),
        "metadata": dict(event.metadata),
        "chunk_profile": event.chunk_profile,
        "source_uri": event.source_uri,
    }
    try:
        return Submission.model_validate(data, context={"policy": policy, "profiles": profiles})
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        first = errors[0]
        ctx = first.get("ctx") or {}
        loc = ".".join(str(p) for p in first["loc"])
        field = str(ctx.get("field") or loc) or None
        reason = first["msg"]
        if len(errors) > 1:
            others = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or (e.get('ctx') or {}).get('field', '')}: "
                f"{e['msg']}"
                for e in errors[1:]
            )
            reason = f"{reason} (also: {others})"
        hint = ctx.get("hint")
        return Rejection(
            code=first["type"] if first["type"] in _CODES else "invalid",
            reason=reason,
            field=field,
            hint=str(hint) if hint else None,
        )


_CODES: Final = frozenset(
    {"invalid", "empty", "too_large", "undecodable", "unsupported", "expired", "version_required"}
)
