"""Re-index by replay (DESIGN.md §4, index): ``strata reindex --embed-model NAME``.

    docs.chunked ──► embed (live group "embed", live model)     ──► docs.embedded ─┐
                 └─► embed (group "embed@NAME", identity          ──► docs.embedded ─┤
                            "embed.reindex", the new model)                          ▼
                                              index: each event into the collection of its model

1. Start a second embed consumer group ``embed@<model>`` with ``settings.embed.model`` set to
   the new model and only its ``docs.chunked`` subscription (queries stay with the live
   group).  It replays ``docs.chunked`` from the beginning and publishes under its own
   identity (:data:`REINDEX_IDENTITY`), so its output event ids differ from the live group's
   (derived ids hash the producing identity) and the index does not drop them as duplicates.
2. The running index service writes each ``docs.embedded`` event into the collection of its
   event's model — the new collection fills while the live alias keeps serving the old one.
3. Caught up = the group's lag on ``docs.chunked`` is 0 **and** every chunk the group
   embedded appears in a signed ``docs.indexed`` event for the new collection (the count
   check, read from the bus, so it works whichever process runs the index).  Then the live
   alias is swapped; the old collection stays.  ``rollback=True`` swaps back.

After the swap, queries embedded by the live embed service (still the old model) keep using
the old collection — the index searches the collection of the query's model — until the
embed deployment is switched to the new model (restart it with ``STRATA_EMBED__MODEL`` and,
to continue exactly where the replay stopped, the group ``embed@<model>``).
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

import structlog
from aiokafka import TopicPartition

from stratamesh.bus import headers as H
from stratamesh.bus import topics
from stratamesh.bus.admin import consumer_lag
from stratamesh.bus.codec import Codec
from stratamesh.bus.offsets import iter_records, offset_bounds, open_consumer, topic_partitions
from stratamesh.bus.service import Service
from stratamesh.config import Settings
from stratamesh.errors import ConfigError, DecodeError, SecurityError, StrataError
from stratamesh.events import ChunksEmbedded, ChunksIndexed
from stratamesh.security.keys import Keyring, generate_identity
from stratamesh.security.signing import SignatureCache, leaf_hash, verify_record
from stratamesh.stores.vectors import (
    AliasBook,
    collection_name,
    live_alias,
    open_alias_book,
)

__all__ = [
    "EMBED_APP",
    "REINDEX_IDENTITY",
    "ReindexResult",
    "ReindexStalled",
    "reindex",
    "reindex_group",
]

log = structlog.get_logger("stratamesh.reindex")

EMBED_APP: Final = "stratamesh.services.embed.app"
REINDEX_IDENTITY: Final = "embed.reindex"
"""The identity the re-index embed group publishes under (an instance of ``embed``)."""

Progress = Callable[..., None]


class ReindexStalled(StrataError):
    """The replay stopped making progress before it caught up: the alias was not swapped."""


def reindex_group(embed_model: str) -> str:
    return f"embed@{embed_model}"


@dataclass
class ReindexResult:
    alias: str
    collection: str  # what the alias points at now
    previous: str | None  # what it pointed at before
    embed_model: str  # model id@revision of `collection` ("" for a rollback)
    chunks: int = 0
    seconds: float = 0.0
    rolled_back: bool = False

    def __str__(self) -> str:
        verb = "rolled back to" if self.rolled_back else "→"
        moved = self.previous and self.previous != self.collection
        was = f" (was {self.previous})" if moved else ""
        tail = "" if self.rolled_back else f"; {self.chunks} chunks in {self.seconds:.1f} s"
        return f"alias {self.alias} {verb} {self.collection}{was}{tail}"


@dataclass
class _Follower:
    """Reads a topic incrementally (no consumer group) and verifies each record's producer."""

    topic: str
    positions: dict[TopicPartition, int] = field(default_factory=dict)

    async def read(self, consumer: Any) -> list[Any]:
        """The records appended since the last call (all of them the first time)."""
        if not self.positions:
            parts = await topic_partitions(consumer, self.topic)
            self.positions = {TopicPartition(self.topic, p): 0 for p in parts}
        bounds = await offset_bounds(consumer, list(self.positions))
        ranges = {}
        for tp, b in bounds.items():
            start = max(self.positions[tp], b.begin)
            if b.end > start:
                ranges[tp] = (start, b.end)
        out: list[Any] = []
        async for _, records in iter_records(consumer, ranges):
            out.extend(records)
        for tp, (_, stop) in ranges.items():
            self.positions[tp] = stop
        return out


class _Verifier:
    def __init__(self, settings: Settings) -> None:
        self.keyring = Keyring.load(settings.keys_dir)
        self.codec = Codec.from_settings(settings)
        self.cache = SignatureCache()

    def producer(self, record: Any) -> str:
        value = H.header_dict(record.headers).get(H.PRODUCER)
        return value.decode("utf-8", "replace") if value else ""

    def event(self, record: Any) -> Any | None:
        """The decoded event if its producer may write the topic and its signature holds."""
        headers = H.header_dict(record.headers)
        producer = self.producer(record)
        spec = topics.topic(record.topic)
        if not producer or not spec.allows(producer):
            return None
        try:
            leaf = leaf_hash(record.key, record.value or b"", headers)
            verify_record(self.keyring, producer, leaf, headers.get(H.SIGNATURE), self.cache)
            return self.codec.decode(record.value or b"")
        except (SecurityError, DecodeError):
            return None


def _embed_service(settings: Settings, group: str) -> Service:
    """The embed service for the replay group: its docs.chunked subscription only."""
    build = importlib.import_module(EMBED_APP).build_service
    kwargs: dict[str, Any] = {"group": group}
    if "identity" in inspect.signature(build).parameters:
        kwargs["identity"] = REINDEX_IDENTITY
    svc: Service = build(settings, **kwargs)
    svc.identity = REINDEX_IDENTITY
    svc.group = group
    for name in list(svc.subscriptions):
        if topics.logical_topic(name) != topics.DOCS_CHUNKED:
            del svc.subscriptions[name]
    if not svc.subscriptions:
        raise ConfigError(f"{EMBED_APP}.build_service has no docs.chunked subscription")
    return svc


async def _rollback(settings: Settings, book: AliasBook, alias: str) -> ReindexResult:
    previous = await book.previous(alias)
    if previous is None:
        raise ConfigError(f"alias {alias!r} has no previous collection to roll back to")
    current = await book.swap(alias, previous)
    log.info("alias rolled back", alias=alias, collection=previous, previous=current)
    return ReindexResult(alias, previous, current, "", rolled_back=True)


async def reindex(
    settings: Settings,
    embed_model: str,
    *,
    progress: Progress | None = None,
    rollback: bool = False,
    poll_s: float = 1.0,
    stall_timeout_s: float = 300.0,
) -> ReindexResult:
    """Build the collection of ``embed_model`` by replaying ``docs.chunked``, then swap the
    live alias to it (``rollback=True``: swap back to the previous collection instead).

    ``progress(**state)`` is called every ``poll_s`` with ``phase``, ``lag`` (records of
    docs.chunked the replay group has not committed), ``embedded`` and ``indexed`` (chunks),
    ``collection``.  Raises :class:`ReindexStalled` when nothing moved for
    ``stall_timeout_s`` before catching up (see ``strata dlq ls``); the alias is unchanged.
    """
    alias = live_alias(settings.index.collection_prefix)
    book = open_alias_book(settings)
    if rollback:
        return await _rollback(settings, book, alias)
    if not embed_model:
        raise ConfigError("name the embedding model to re-index with (--embed-model)")

    started = time.monotonic()
    group = reindex_group(embed_model)
    replay_settings = settings.model_copy(
        update={"embed": settings.embed.model_copy(update={"model": embed_model})}
    )
    if not (settings.keys_dir / f"{REINDEX_IDENTITY}.key").exists():
        generate_identity(settings.keys_dir, REINDEX_IDENTITY)
        log.warning(
            "created the re-index identity; consumers started before trust it only after a restart",
            identity=REINDEX_IDENTITY,
        )
    embedder = _embed_service(replay_settings, group)
    verifier = _Verifier(settings)
    embedded_topic = _Follower(topics.DOCS_EMBEDDED)
    indexed_topic = _Follower(topics.DOCS_INDEXED)
    expected: set[tuple[str, str]] = set()  # (tenant, chunk id) embedded by the replay group
    indexed: dict[str, set[tuple[str, str]]] = {}  # collection → (tenant, chunk id)
    models: set[str] = set()
    state: tuple[int, int, int] | None = None
    last_move = time.monotonic()
    target: str | None = None

    def report(**s: Any) -> None:
        if progress is not None:
            progress(**s)

    await embedder.start(replay_settings)
    try:
        # One tool consumer per topic: after an assignment, a consumer's cluster metadata
        # only lists the assigned topics, so one consumer cannot follow two.
        async with open_consumer(settings) as c_embedded, open_consumer(settings) as c_indexed:
            while True:
                lag = sum(
                    p.lag
                    for p in (await consumer_lag(settings, group, topics.DOCS_CHUNKED)).values()
                )
                for rec in await embedded_topic.read(c_embedded):
                    if verifier.producer(rec) != REINDEX_IDENTITY:
                        continue  # the live group's output (or anyone else's)
                    ev = verifier.event(rec)
                    if isinstance(ev, ChunksEmbedded):
                        models.add(ev.embed_model)
                        expected.update((ev.tenant, e.chunk.chunk_id) for e in ev.embeddings)
                for rec in await indexed_topic.read(c_indexed):
                    ev = verifier.event(rec)
                    if isinstance(ev, ChunksIndexed):
                        indexed.setdefault(ev.collection, set()).update(
                            (ev.tenant, c) for c in ev.chunk_ids
                        )
                if len(models) > 1:
                    raise ConfigError(f"the replay produced several models: {sorted(models)}")
                if models:
                    target = collection_name(settings.index.collection_prefix, next(iter(models)))
                done = len(expected & indexed.get(target, set())) if target else 0
                report(
                    phase="replaying",
                    lag=lag,
                    embedded=len(expected),
                    indexed=done,
                    collection=target or "",
                )
                if lag == 0 and target is not None and expected and done == len(expected):
                    break
                now = time.monotonic()
                if (lag, len(expected), done) != state:
                    state, last_move = (lag, len(expected), done), now
                elif now - last_move > stall_timeout_s:
                    what = (
                        "docs.chunked is empty: nothing to re-index"
                        if lag == 0 and not expected
                        else f"{len(expected) - done} of {len(expected)} chunks not indexed, "
                        f"lag {lag}"
                    )
                    raise ReindexStalled(
                        f"no progress for {stall_timeout_s:.0f} s ({what}); the alias is "
                        "unchanged — see `strata dlq ls`"
                    )
                await asyncio.sleep(poll_s)
    finally:
        await embedder.stop()
    assert target is not None
    previous = await book.swap(alias, target)
    seconds = time.monotonic() - started
    report(phase="swapped", lag=0, embedded=len(expected), indexed=len(expected), collection=target)
    log.info("alias swapped", alias=alias, collection=target, previous=previous)
    return ReindexResult(
        alias, target, previous, next(iter(models)), chunks=len(expected), seconds=seconds
    )
