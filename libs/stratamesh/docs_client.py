"""The client side of ``strata ingest``: submit files, folders and BEIR corpora, then count
what ingest made of them.

    summary = await ingest_paths(settings, [Path("docs/"), Path("corpus.jsonl")],
                                 identity="client:acme-web", progress=bar_update)
    print(summary.describe())   # accepted / unchanged / rejected (with reasons) / pending

What is read:

* ``.txt`` / ``.text``, ``.md`` / ``.markdown``, ``.html`` / ``.htm`` files: one document
  each.  Its id is the file name for a file given directly, ``<folder name>/<relative
  path>`` for a file found in a folder given (folders are walked recursively, hidden
  entries skipped, files of other types listed as skipped).
* ``.jsonl`` files: a BEIR corpus, one document per line (``{"_id", "title", "text"}``),
  with ``doc_id`` = ``_id``.

Every document is published as a signed ``DocumentSubmitted`` by ``identity`` (a client
key, ``client:<name>``; its registered tenant is the tenant, whatever the payload says).
With ``wait`` the outcomes are read back from ``docs.chunked`` and ``docs.rejected``,
starting at their end offsets taken *before* publishing: ingest emits exactly one outcome
per submission with the id ``derived_event_id(submission id, "ingest", 0)``, so outcomes
are matched by event id (and doc id) without decoding anything else.  With ``searchable``
(the default) the wait goes on until index says each accepted version is searchable
(``ChunksIndexed`` on ``docs.indexed``, matched by tenant, doc id and version), so a
question asked right after ``strata ingest`` sees the documents.  Problems found
locally (unreadable file, invalid JSONL line, duplicate id in one run) are reported as
rejections with ``source`` = ``local`` and are not published.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from aiokafka import TopicPartition

from stratamesh.bus import headers as H
from stratamesh.bus import topics as T
from stratamesh.bus.codec import Codec
from stratamesh.bus.offsets import open_consumer, topic_partitions, true_end_offsets
from stratamesh.bus.publish import Publisher
from stratamesh.config import Settings
from stratamesh.errors import StrataError
from stratamesh.events import (
    ChunksIndexed,
    ContentType,
    DocumentChunked,
    DocumentRejected,
    DocumentSubmitted,
    derived_event_id,
    new_event_id,
)
from stratamesh.security.keys import Keyring
from stratamesh.security.signing import SignatureCache, leaf_hash, verify_record

__all__ = [
    "CONTENT_TYPES",
    "INGEST_IDENTITY",
    "IngestSummary",
    "Rejected",
    "ingest_paths",
]

# File suffix → content type; `.jsonl` files are BEIR corpora (one document per line).
CONTENT_TYPES: Final[dict[str, ContentType]] = {
    ".txt": ContentType.TEXT,
    ".text": ContentType.TEXT,
    ".md": ContentType.MARKDOWN,
    ".markdown": ContentType.MARKDOWN,
    ".html": ContentType.HTML,
    ".htm": ContentType.HTML,
}
BEIR_SUFFIX: Final = ".jsonl"
# The identity whose outputs carry the derived ids we wait for.
INGEST_IDENTITY: Final = "ingest"
INDEX_IDENTITY: Final = "index"
# Submissions in flight (sent, not yet acknowledged) at most.
_WINDOW: Final = 512
# Bytes kept free below the producer's max request size for headers and framing.
_RECORD_HEADROOM: Final = 64 * 1024
LOCAL: Final = "local"


@dataclass(frozen=True, slots=True)
class Rejected:
    doc_id: str
    source: str  # the file (and line) it came from
    code: str
    reason: str
    field: str | None = None
    hint: str | None = None
    by: str = INGEST_IDENTITY  # "ingest", or "local" when refused before publishing


@dataclass
class IngestSummary:
    total: int = 0  # documents found
    submitted: int = 0  # published (and acknowledged by the broker)
    accepted: int = 0  # a new version was chunked
    unchanged: int = 0  # identical to the latest version: nothing new
    chunks: int = 0  # chunks of the accepted documents
    rejected: list[Rejected] = field(default_factory=list)
    pending: list[str] = field(default_factory=list)  # no outcome before the timeout
    skipped: list[str] = field(default_factory=list)  # files of unsupported types in folders
    versions: dict[str, int] = field(default_factory=dict)  # doc id → accepted version
    searchable: int = 0  # accepted versions index reported searchable
    unsearchable: list[str] = field(default_factory=list)  # accepted, not indexed in time
    waited: bool = True
    waited_searchable: bool = False
    elapsed_s: float = 0.0

    @property
    def done(self) -> int:
        return self.accepted + self.unchanged + len(self.rejected)

    def describe(self) -> str:
        """A human summary: counts, then every rejection with its reason and hint."""
        if not self.waited:
            head = f"submitted {self.submitted} of {self.total} documents (not waiting for ingest)"
        else:
            searchable = f", {self.searchable} searchable" if self.waited_searchable else ""
            head = (
                f"{self.total} documents: {self.accepted} accepted ({self.chunks} chunks"
                f"{searchable}), {self.unchanged} unchanged, {len(self.rejected)} rejected"
            )
            if self.pending:
                head += f", {len(self.pending)} without an answer yet"
        lines = [f"{head} in {self.elapsed_s:.1f} s"]
        for r in self.rejected[:50]:
            where = f" (field {r.field})" if r.field else ""
            lines.append(f"  rejected {r.doc_id} ({r.source}): {r.code}{where}: {r.reason}")
            if r.hint:
                lines.append(f"    hint: {r.hint}")
        if len(self.rejected) > 50:
            lines.append(f"  ... and {len(self.rejected) - 50} more rejections")
        if self.pending:
            shown = ", ".join(self.pending[:10])
            more = f" (+{len(self.pending) - 10})" if len(self.pending) > 10 else ""
            lines.append(f"  pending: {shown}{more}: is the ingest service running?")
        if self.unsearchable:
            shown = ", ".join(self.unsearchable[:10])
            more = f" (+{len(self.unsearchable) - 10})" if len(self.unsearchable) > 10 else ""
            lines.append(
                f"  not searchable yet: {shown}{more}: are embed and index running? "
                "(`strata dlq ls` shows failures)"
            )
        if self.skipped:
            lines.append(f"  skipped {len(self.skipped)} files of unsupported types")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "total": self.total,
            "submitted": self.submitted,
            "accepted": self.accepted,
            "unchanged": self.unchanged,
            "rejected": [asdict(r) for r in self.rejected],
            "pending": self.pending,
            "skipped": self.skipped,
            "chunks": self.chunks,
            "searchable": self.searchable,
            "unsearchable": self.unsearchable,
            "versions": self.versions,
            "elapsed_s": round(self.elapsed_s, 3),
        }


# -- reading documents ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Doc:
    doc_id: str
    source: str
    title: str
    content: str
    content_type: ContentType


@dataclass(frozen=True, slots=True)
class _Source:
    path: Path
    doc_id: str  # for single files; BEIR lines use their _id
    beir: bool
    count: int


def _sources(paths: list[Path], skipped: list[str]) -> tuple[list[_Source], list[Rejected]]:
    found: list[_Source] = []
    problems: list[Rejected] = []

    def add(path: Path, doc_id: str, explicit: bool) -> None:
        suffix = path.suffix.lower()
        if suffix == BEIR_SUFFIX:
            try:
                with path.open("rb") as f:
                    count = sum(1 for line in f if line.strip())
            except OSError as exc:
                problems.append(_local(str(path), str(path), "unreadable", str(exc)))
                return
            found.append(_Source(path, doc_id, True, count))
        elif suffix in CONTENT_TYPES:
            found.append(_Source(path, doc_id, False, 1))
        elif explicit:
            problems.append(
                _local(
                    doc_id,
                    str(path),
                    "unsupported",
                    f"files of type {suffix or '(none)'} are not supported",
                    hint="convert to .txt, .md or .html (BEIR corpora: .jsonl)",
                )
            )
        else:
            skipped.append(str(path))

    for root in paths:
        if root.is_dir():
            base = root.resolve().name
            for path in sorted(root.rglob("*")):
                rel = path.relative_to(root)
                if any(part.startswith(".") for part in rel.parts) or not path.is_file():
                    continue
                add(path, f"{base}/{rel.as_posix()}", False)
        elif root.is_file():
            add(root, root.name, True)
        else:
            problems.append(_local(str(root), str(root), "not_found", "no such file or folder"))
    return found, problems


def _local(
    doc_id: str, source: str, code: str, reason: str, *, hint: str | None = None
) -> Rejected:
    return Rejected(doc_id, source, code, reason, None, hint, by=LOCAL)


def _read_text(path: Path) -> str:
    return path.read_bytes().decode("utf-8-sig")


def _documents(source: _Source, id_prefix: str) -> Iterator[_Doc | Rejected]:
    path = source.path
    if not source.beir:
        doc_id = id_prefix + source.doc_id
        try:
            text = _read_text(path)
        except UnicodeDecodeError as exc:
            yield _local(
                doc_id, str(path), "undecodable", f"not UTF-8 text ({exc.reason} at byte "
                f"{exc.start})", hint="convert the file to UTF-8"
            )  # fmt: skip
            return
        except OSError as exc:
            yield _local(doc_id, str(path), "unreadable", str(exc))
            return
        content_type = CONTENT_TYPES[path.suffix.lower()]
        # Markdown and HTML carry their own titles; a text file is titled by its name.
        title = path.stem if content_type == ContentType.TEXT else ""
        yield _Doc(doc_id, str(path), title, text, content_type)
        return
    try:
        handle = path.open("rb")
    except OSError as exc:
        yield _local(str(path), str(path), "unreadable", str(exc))
        return
    with handle:
        for n, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            where = f"{path}:{n}"
            try:
                obj = json.loads(raw.decode("utf-8-sig"))
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                yield _local(where, where, "invalid", f"not a JSON line: {exc}", hint=_BEIR_HINT)
                continue
            if (
                not isinstance(obj, dict)
                or not isinstance(obj.get("text"), str)
                or obj.get("_id") in (None, "")
            ):
                yield _local(
                    where, where, "invalid", "a BEIR record needs '_id' and a string 'text'",
                    hint=_BEIR_HINT,
                )  # fmt: skip
                continue
            beir_title = obj.get("title")
            yield _Doc(
                id_prefix + str(obj["_id"]),
                where,
                beir_title if isinstance(beir_title, str) else "",
                obj["text"],
                ContentType.TEXT,
            )


_BEIR_HINT: Final = 'each line of a BEIR corpus is {"_id": "...", "title": "...", "text": "..."}'


# -- publishing and waiting ----------------------------------------------------------------------


class _Outcomes:
    """Reads docs.chunked / docs.rejected from given offsets and matches expected ids."""

    def __init__(
        self,
        settings: Settings,
        consumer: Any,
        summary: IngestSummary,
        notify: Callable[[], None],
        producer_identity: str,
        tenant: str,
    ) -> None:
        self.consumer = consumer
        self.summary = summary
        self.notify = notify
        self.codec = Codec.from_settings(settings)
        self.expected: dict[str, _Doc] = {}  # outcome event id → submission
        self.producer = producer_identity
        self.ring = Keyring.load(settings.keys_dir)
        self.tenant = tenant
        # Accepted versions not yet searchable, and searchable ones whose acceptance was not
        # read yet (the two topics are fetched independently).
        self.indexing: set[tuple[str, int]] = set()
        self.indexed_early: set[tuple[str, int]] = set()
        self.sig_cache = SignatureCache()
        self.last_progress = time.monotonic()
        self.matched = 0

    def expect(self, outcome_id: str, doc: _Doc) -> None:
        self.expected[outcome_id] = doc

    def forget(self, outcome_id: str) -> None:
        self.expected.pop(outcome_id, None)

    async def read(self, publishing: asyncio.Event, timeout_s: float) -> None:
        while True:
            if publishing.is_set() and not self.expected and not self.indexing:
                return
            if publishing.is_set() and time.monotonic() - self.last_progress > timeout_s:
                return
            batch = await self.consumer.getmany(timeout_ms=200)
            for records in batch.values():
                for rec in records:
                    self._record(rec)

    def _record(self, rec: Any) -> None:
        headers = H.header_dict(rec.headers)
        if rec.topic == T.DOCS_INDEXED:
            self._indexed(rec, headers)
            return
        event_id = headers.get(H.EVENT_ID, b"").decode()
        doc = self.expected.get(event_id)
        if doc is None or headers.get(H.PRODUCER, b"").decode() != self.producer:
            return
        event = self._event(rec, headers)
        if getattr(event, "doc_id", None) != doc.doc_id:
            return
        del self.expected[event_id]
        s = self.summary
        if isinstance(event, DocumentChunked):
            s.accepted += 1
            s.chunks += len(event.chunks)
            s.versions[doc.doc_id] = event.doc_version
            if s.waited_searchable:
                key = (doc.doc_id, event.doc_version)
                if key in self.indexed_early:
                    s.searchable += 1
                else:
                    self.indexing.add(key)
        elif isinstance(event, DocumentRejected):
            if event.code == "unchanged":
                s.unchanged += 1
            else:
                s.rejected.append(
                    Rejected(
                        doc.doc_id, doc.source, event.code, event.reason, event.field, event.hint
                    )
                )
        self.last_progress = time.monotonic()
        self.notify()

    def _indexed(self, rec: Any, headers: dict[str, bytes]) -> None:
        if headers.get(H.TENANT, b"").decode() != self.tenant:
            return
        if T.service_of(headers.get(H.PRODUCER, b"").decode()) != INDEX_IDENTITY:
            return
        event = self._event(rec, headers)
        if not isinstance(event, ChunksIndexed):
            return
        key = (event.doc_id, event.doc_version)
        if key in self.indexing:
            self.indexing.discard(key)
            self.summary.searchable += 1
            self.last_progress = time.monotonic()
        elif self.summary.waited_searchable:
            self.indexed_early.add(key)

    def _event(self, rec: Any, headers: dict[str, bytes]) -> Any:
        """The record's event, or None when it does not decode or its signature fails (not
        the service's: ignore it, the real one may still come).  Signatures are checked
        when the local keyring knows the producer (it does on a `strata up` machine)."""
        producer = headers.get(H.PRODUCER, b"").decode()
        if producer in self.ring.identities:
            try:
                verify_record(
                    self.ring,
                    producer,
                    leaf_hash(rec.key, rec.value or b"", headers),
                    headers.get(H.SIGNATURE),
                    self.sig_cache,
                )
            except StrataError:
                return None
        try:
            return self.codec.decode(rec.value or b"")
        except StrataError:
            return None


@contextlib.asynccontextmanager
async def _outcome_reader(settings: Settings, wait: bool, searchable: bool) -> AsyncIterator[Any]:
    if not wait:
        yield None
        return
    names = (T.DOCS_CHUNKED, T.DOCS_REJECTED) + ((T.DOCS_INDEXED,) if searchable else ())
    async with open_consumer(settings) as consumer:
        tps = [
            TopicPartition(name, p)
            for name in names
            for p in await topic_partitions(consumer, name)
        ]
        ends = await true_end_offsets(consumer, tps)
        consumer.assign(tps)
        for tp in tps:
            consumer.seek(tp, ends[tp])
        yield consumer


async def ingest_paths(
    settings: Settings,
    paths: list[Path],
    *,
    identity: str,
    tenant_hint: str | None = None,
    progress: Callable[[int, int], None] | None = None,
    wait: bool = True,
    searchable: bool = True,
    timeout_s: float = 60.0,
    id_prefix: str = "",
    service_identity: str = INGEST_IDENTITY,
) -> IngestSummary:
    """Submit every document under ``paths`` as ``identity``; with ``wait``, count outcomes.

    ``progress(done, total)`` is called as documents are answered (or, without ``wait``,
    acknowledged by the broker).  ``timeout_s``: stop waiting when no outcome arrived for
    that long after the last submission (the rest is listed as ``pending``).
    With ``searchable`` the wait includes index making each accepted version searchable.
    ``tenant_hint`` fills the payload's tenant when the key has none registered (unsigned
    development ingress); a registered client key's tenant always wins.  ``id_prefix`` is
    put before every document id.
    """
    started = time.monotonic()
    summary = IngestSummary(waited=wait, waited_searchable=wait and searchable)
    sources, problems = _sources(list(paths), summary.skipped)
    summary.total = sum(s.count for s in sources) + len(problems)
    client = Keyring.load(settings.keys_dir).client(identity)
    tenant = client.tenant if client is not None else (tenant_hint or "default")
    acked = 0

    def report() -> None:
        if progress is not None:
            done = summary.done if wait else acked + len(summary.rejected)
            progress(done, summary.total)

    for p in problems:
        summary.rejected.append(p)
    report()
    seen: set[str] = set()
    max_bytes = settings.producer.max_request_size - _RECORD_HEADROOM
    async with (
        _outcome_reader(settings, wait, searchable) as consumer,
        Publisher(settings, identity) as pub,
    ):
        outcomes = (
            _Outcomes(settings, consumer, summary, report, service_identity, tenant)
            if wait
            else None
        )
        publishing = asyncio.Event()
        reader = (
            asyncio.create_task(outcomes.read(publishing, timeout_s), name="ingest-outcomes")
            if outcomes is not None
            else None
        )
        inflight: list[tuple[asyncio.Future[Any], str, _Doc]] = []

        async def settle(futures: list[tuple[asyncio.Future[Any], str, _Doc]]) -> None:
            nonlocal acked
            results = await asyncio.gather(*(f for f, _, _ in futures), return_exceptions=True)
            for (_, outcome_id, doc), res in zip(futures, results, strict=True):
                if isinstance(res, BaseException):
                    if outcomes is not None:
                        outcomes.forget(outcome_id)
                    summary.rejected.append(
                        _local(
                            doc.doc_id, doc.source, "publish_failed", f"{type(res).__name__}: {res}"
                        )
                    )
                else:
                    summary.submitted += 1
                    acked += 1
            if not wait:
                report()

        try:
            for source in sources:
                for doc in _documents(source, id_prefix):
                    if isinstance(doc, Rejected):
                        summary.rejected.append(doc)
                        report()
                        continue
                    if doc.doc_id in seen:
                        summary.rejected.append(
                            _local(
                                doc.doc_id,
                                doc.source,
                                "duplicate_id",
                                "another document of this run has the same id",
                                hint="give documents distinct ids (or ingest them separately)",
                            )
                        )
                        report()
                        continue
                    seen.add(doc.doc_id)
                    if len(doc.content.encode()) > max_bytes:
                        summary.rejected.append(
                            _local(
                                doc.doc_id,
                                doc.source,
                                "too_large",
                                f"{len(doc.content.encode()) / 1e6:.1f} MB is more than one "
                                "record may carry",
                                hint="split the document into several files",
                            )
                        )
                        report()
                        continue
                    event = DocumentSubmitted(
                        event_id=new_event_id(),
                        tenant=tenant,
                        occurred_at=datetime.now(UTC),
                        producer=identity,
                        doc_id=doc.doc_id,
                        title=doc.title,
                        content=doc.content,
                        content_type=doc.content_type,
                        source_uri=doc.source,
                    )
                    outcome_id = derived_event_id(event.event_id, service_identity, 0)
                    if outcomes is not None:
                        outcomes.expect(outcome_id, doc)
                    inflight.append((pub.producer.send(pub.record(event)), outcome_id, doc))
                    if len(inflight) >= _WINDOW:
                        batch, inflight = inflight, []
                        await settle(batch)
            if inflight:
                await settle(inflight)
            publishing.set()
            if outcomes is not None:
                outcomes.last_progress = time.monotonic()
            if reader is not None:
                await reader
        finally:
            if reader is not None and not reader.done():
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reader
        if outcomes is not None:
            summary.pending = sorted(d.doc_id for d in outcomes.expected.values())
            summary.unsearchable = sorted(doc_id for doc_id, _ in outcomes.indexing)
    report()
    summary.elapsed_s = time.monotonic() - started
    return summary
