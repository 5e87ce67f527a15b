"""What a request may see: the search filter of a QueryEmbedded.

The tenant is the authenticated one (``ctx.tenant``); nothing in the payload can widen it.
``RetrievalPlan.filters`` are exact-match filters on document metadata, except a few
reserved keys that address the index's own fields:

- ``doc_id``: one document, or several separated by commas;
- ``version``: one version of the document(s) — superseded or not;
- ``knowledge_class``: ``fluid`` or ``anchored``.

``RetrievalPlan.include_superseded`` searches every version; ``Query.as_of`` the knowledge
valid at that time (versions current then, chunks not yet expired then); ``Query.principals``
opens chunks whose ACL names one of them (chunks with an empty ACL are tenant-wide).
"""

from __future__ import annotations

from typing import Final

from stratamesh.events import Query, RetrievalPlan
from stratamesh.stores.vectors import SearchFilter

__all__ = ["RESERVED_KEYS", "InvalidFilter", "search_filter"]

RESERVED_KEYS: Final = frozenset({"doc_id", "version", "knowledge_class"})
_KNOWLEDGE_CLASSES: Final = frozenset({"fluid", "anchored"})
_MAX_METADATA_FILTERS: Final = 16


class InvalidFilter(ValueError):
    """A filter that cannot match anything meaningful (the request gets no context)."""


def search_filter(tenant: str, query: Query, plan: RetrievalPlan, now_ms: int) -> SearchFilter:
    if not tenant:
        raise InvalidFilter("no authenticated tenant")
    filters = dict(plan.filters)
    version: int | None = None
    if "version" in filters:
        raw = filters.pop("version")
        try:
            version = int(raw)
        except ValueError:
            raise InvalidFilter(f"filter version={raw!r} is not an integer") from None
    doc_ids: tuple[str, ...] = ()
    if "doc_id" in filters:
        doc_ids = tuple(d.strip() for d in filters.pop("doc_id").split(",") if d.strip())
    knowledge_class = filters.pop("knowledge_class", None)
    if knowledge_class is not None and knowledge_class not in _KNOWLEDGE_CLASSES:
        raise InvalidFilter(f"filter knowledge_class={knowledge_class!r} is not fluid|anchored")
    if len(filters) > _MAX_METADATA_FILTERS:
        raise InvalidFilter(f"more than {_MAX_METADATA_FILTERS} metadata filters")
    as_of = query.as_of
    return SearchFilter(
        tenant=tenant,
        now_ms=now_ms,
        as_of_ms=int(as_of.timestamp() * 1000) if as_of is not None else None,
        include_superseded=plan.include_superseded,
        version=version,
        doc_ids=doc_ids,
        knowledge_class=knowledge_class,
        principals=tuple(query.principals),
        metadata=filters,
    )
