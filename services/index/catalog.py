"""Which collection a write goes to and which one a query searches.

- A write goes to the collection of its event's embedding model (``embed_model`` id@rev),
  created on first use; the very first collection also becomes the live alias's target.
  So a re-index (a second embed consumer group with another model) fills its own collection
  while the live one keeps serving.
- A query searches the live alias — unless the alias points at a collection of another
  model than the one that embedded the query (during and right after a re-index, until the
  embed service runs the new model): then the collection of the query's model, so query
  and document vectors always come from the same model.  ``RetrievalPlan.collection`` may
  name another collection or alias of this index; the same model rule applies.
"""

from __future__ import annotations

import time
from typing import Final

from stratamesh.stores.vectors import (
    CollectionInfo,
    VectorStore,
    collection_name,
    live_alias,
)

__all__ = ["Catalog"]

ALIAS_TTL_S: Final = 1.0  # how stale a cached alias target may be (a swap shows within this)
MAX_METADATA_INDEXES: Final = 64  # per collection: filters create keyword indexes on demand


class Catalog:
    def __init__(self, store: VectorStore, prefix: str) -> None:
        self.store = store
        self.prefix = prefix
        self.alias = live_alias(prefix)
        self._models: dict[str, str] = {}  # collection → embed model (immutable once made)
        self._writable: set[str] = set()
        self._alias_cache: tuple[float, str | None] | None = None
        self._indexed_fields: dict[str, set[str]] = {}

    def collection_of(self, embed_model: str) -> str:
        return collection_name(self.prefix, embed_model)

    async def for_write(self, embed_model: str, dim: int) -> str:
        """The collection of ``embed_model`` (created on first use)."""
        name = self.collection_of(embed_model)
        if name not in self._writable:
            await self.store.ensure_collection(name, dim=dim, embed_model=embed_model)
            if await self.store.aliases.get(self.alias) is None:
                await self.store.aliases.swap(self.alias, name)
                self._alias_cache = None
            self._models[name] = embed_model
            self._writable.add(name)
        return name

    async def live(self) -> str | None:
        """The live alias's target (cached for ALIAS_TTL_S)."""
        now = time.monotonic()
        if self._alias_cache is None or now - self._alias_cache[0] > ALIAS_TTL_S:
            self._alias_cache = (now, await self.store.aliases.get(self.alias))
        return self._alias_cache[1]

    async def model_of(self, collection: str) -> str | None:
        if collection not in self._models:
            info: CollectionInfo | None = await self.store.collection_info(collection)
            if info is None:
                return None
            self._models[collection] = info.embed_model
        return self._models[collection]

    async def for_query(self, embed_model: str, requested: str | None = None) -> str | None:
        """The collection to search for a query embedded with ``embed_model`` (None: none)."""
        target: str | None
        if requested and requested != self.alias:
            if not requested.startswith(self.prefix):
                return None  # not a collection of this index
            target = await self.store.aliases.get(requested) or requested
        else:
            target = await self.live()
        if target is not None and await self.model_of(target) == embed_model:
            return target
        own = self.collection_of(embed_model)
        return own if await self.model_of(own) is not None else None

    async def ensure_metadata_indexes(self, collection: str, keys: list[str]) -> None:
        """Keyword indexes on the ``metadata.<key>`` fields a search filters on."""
        done = self._indexed_fields.setdefault(collection, set())
        for key in keys:
            field_name = f"metadata.{key}"
            if field_name in done or len(done) >= MAX_METADATA_INDEXES:
                continue
            await self.store.ensure_keyword_index(collection, field_name)
            done.add(field_name)
