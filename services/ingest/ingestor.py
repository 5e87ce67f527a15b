"""From a submitted document to its outcome event: validate, parse, decide, chunk.

Each ``DocumentSubmitted`` yields exactly one event, with id ``ctx.derive_id(0)``:

* ``DocumentChunked`` — a new version, with its chunks;
* ``DocumentRejected`` — refused (validation, format, version conflict), or ``unchanged``:
  an identical re-submission produces no new chunks, only this acknowledgement (code
  ``unchanged``, ``doc_version`` = the existing version), so a client can count it.

Work per batch (one partition's records): validation and parsing in a worker thread, one
state lookup for every document of the batch, decisions and chunking in a worker thread
(in record order, so two versions of one document in one batch are numbered in order),
one state write, then the outputs.  A redelivered submission (same event id) finds its own
version in the state and re-emits the same ``DocumentChunked`` under the same id, which the
next stage drops as a duplicate.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import PurePosixPath
from typing import Final

import structlog

from stratamesh.bus.middleware import Context
from stratamesh.config import ChunkSettings, Settings
from stratamesh.events import Chunk, DocumentChunked, DocumentRejected, DocumentSubmitted
from stratamesh.models.tokenizer import TokenCounter, tokenizer_for
from stratamesh.services.ingest.chunking import (
    CHUNKER_VERSION,
    Measure,
    Profile,
    chunk_blocks,
    chunk_id,
    profile_names,
    resolve_profile,
)
from stratamesh.services.ingest.formats import Block, FormatError, Parsed, blocks_hash, parse
from stratamesh.services.ingest.validate import Policy, Rejection, Submission, validate
from stratamesh.services.ingest.versions import (
    Accept,
    Conflict,
    DocHistory,
    DocKey,
    Replay,
    Unchanged,
    VersionRecord,
    VersionStore,
    decide,
    fingerprint,
    now_ms,
    open_version_store,
)

__all__ = ["Ingestor", "Prepared"]

log = structlog.get_logger("stratamesh.ingest")

# Share of the producer's max request size a DocumentChunked may use (headers, framing).
_EVENT_SIZE_SHARE: Final = 0.75
# Per-chunk bytes beside text, ACL and metadata (ids, numbers, Avro framing).
_CHUNK_OVERHEAD: Final = 160

Item = tuple[DocumentSubmitted, Context]


@dataclass(frozen=True, slots=True)
class Prepared:
    """A valid, parsed submission and what identifies its content."""

    submission: Submission
    parsed: Parsed
    title: str
    content_hash: str
    fingerprint: str
    profile: Profile

    @property
    def key(self) -> DocKey:
        return (self.submission.tenant, self.submission.doc_id)


class Ingestor:
    def __init__(
        self,
        chunk: ChunkSettings,
        tokenizer: TokenCounter,
        store: VersionStore,
        *,
        policy: Policy | None = None,
        max_event_bytes: int = 12 * 1024 * 1024,
    ) -> None:
        self.chunk = chunk
        self.tokenizer = tokenizer
        self.store = store
        self.policy = policy or Policy()
        self.max_event_bytes = max_event_bytes
        self.profiles = profile_names(chunk)

    @classmethod
    def from_settings(
        cls, settings: Settings, *, scope: str, policy: Policy | None = None
    ) -> Ingestor:
        return cls(
            settings.chunk,
            tokenizer_for(settings.embed),
            open_version_store(settings, scope),
            policy=policy,
            max_event_bytes=int(settings.producer.max_request_size * _EVENT_SIZE_SHARE),
        )

    async def close(self) -> None:
        await self.store.close()

    # -- the batch ------------------------------------------------------------------------

    async def handle(self, items: Sequence[Item]) -> None:
        """Publish one outcome event per submission of ``items`` (through its ctx)."""
        inputs = [(event, ctx.tenant) for event, ctx in items]
        prepared = await asyncio.to_thread(self.prepare_all, inputs)
        keys = [p.key for p in prepared if isinstance(p, Prepared)]
        histories = await self.store.load(keys) if keys else {}
        outcomes, writes = await asyncio.to_thread(self.plan, items, prepared, histories)
        await self.store.save(writes)
        for (_, ctx), out in zip(items, outcomes, strict=True):
            ctx.publish(out)

    def prepare_all(
        self, inputs: Sequence[tuple[DocumentSubmitted, str]]
    ) -> list[Prepared | Rejection]:
        return [self.prepare(event, tenant) for event, tenant in inputs]

    def prepare(self, event: DocumentSubmitted, tenant: str) -> Prepared | Rejection:
        """Validate and parse one submission (pure; no state)."""
        checked = validate(event, tenant=tenant, policy=self.policy, profiles=self.profiles)
        if isinstance(checked, Rejection):
            return checked
        profile = resolve_profile(
            self.chunk, self.tokenizer, checked.chunk_profile, checked.content_type.value
        )
        if profile is None:  # validated above; kept for type narrowing
            return Rejection("unsupported", "unknown chunk profile", "chunk_profile")
        try:
            parsed = parse(checked.content, checked.content_type)
        except FormatError as exc:
            return Rejection(exc.code, exc.reason, exc.field, exc.hint or None)
        except (RecursionError, ValueError, IndexError, AssertionError) as exc:
            # A parser choking on pathological input: the document's problem, not a retry's.
            log.warning("document could not be parsed", doc_id=event.doc_id, error=repr(exc))
            return Rejection(
                "undecodable",
                f"the {checked.content_type.value} content could not be parsed "
                f"({type(exc).__name__})",
                "content",
                "simplify the markup (e.g. deeply nested lists or quotes), or submit the text "
                "as content_type 'text'",
            )
        if not parsed.blocks:
            return Rejection(
                "empty",
                f"the {checked.content_type.value} content has no text to index",
                "content",
                "submit a document with text outside markup, scripts and styles",
            )
        title = checked.title or parsed.title or _stem(checked.source_uri)
        content_hash = blocks_hash(parsed.blocks)
        requested_expiry = checked.requested_expires_at
        fp = fingerprint(
            content_hash,
            title=title,
            knowledge_class=checked.knowledge_class.value,
            expires_at_ms=_ms(requested_expiry) if requested_expiry else None,
            acl=checked.acl,
            metadata=checked.metadata,
            chunk_profile=checked.chunk_profile,
        )
        return Prepared(checked, parsed, title, content_hash, fp, profile)

    def plan(
        self,
        items: Sequence[Item],
        prepared: Sequence[Prepared | Rejection],
        histories: dict[DocKey, DocHistory],
    ) -> tuple[list[DocumentChunked | DocumentRejected], list[tuple[DocKey, VersionRecord]]]:
        """Outcome events in record order, and the version records to store first."""
        outcomes: list[DocumentChunked | DocumentRejected] = []
        writes: list[tuple[DocKey, VersionRecord]] = []
        measure = self._measure(items, prepared, histories)
        for (event, ctx), prep in zip(items, prepared, strict=True):
            if isinstance(prep, Rejection):
                outcomes.append(self._rejected(event, ctx, prep))
                continue
            history = histories.setdefault(prep.key, DocHistory())
            decision = decide(
                history,
                requested=prep.submission.doc_version,
                fingerprint=prep.fingerprint,
                event_id=ctx.event_id,
            )
            if isinstance(decision, Replay):
                rec = decision.record
                outcomes.append(
                    self._chunked(event, ctx, prep, rec.version, rec.supersedes, measure)
                )
            elif isinstance(decision, Unchanged):
                rec = decision.record
                outcomes.append(
                    self._rejected(
                        event,
                        ctx,
                        Rejection(
                            "unchanged",
                            f"identical to version {rec.version}, already ingested: nothing new "
                            "to index",
                            None,
                            "change the content (or its title, ACL, metadata or expiry) to "
                            "create a new version",
                        ),
                        content_hash=prep.content_hash,
                        version=rec.version,
                    )
                )
            elif isinstance(decision, Conflict):
                outcomes.append(
                    self._rejected(
                        event,
                        ctx,
                        Rejection(decision.code, decision.reason, decision.field, decision.hint),
                        content_hash=prep.content_hash,
                    )
                )
            else:
                assert isinstance(decision, Accept)
                out = self._chunked(
                    event, ctx, prep, decision.version, decision.supersedes, measure
                )
                if isinstance(out, DocumentChunked):
                    rec = VersionRecord(
                        decision.version,
                        prep.content_hash,
                        prep.fingerprint,
                        ctx.event_id,
                        decision.supersedes,
                        now_ms(),
                    )
                    history.versions[rec.version] = rec
                    writes.append((prep.key, rec))
                outcomes.append(out)
        return outcomes, writes

    def _measure(
        self,
        items: Sequence[Item],
        prepared: Sequence[Prepared | Rejection],
        histories: dict[DocKey, DocHistory],
    ) -> Measure:
        """Token counts for every document of the batch that will be chunked, in one call.

        A dry run of the decisions picks them (unchanged and conflicting documents are not
        tokenized at all); should a later step decide otherwise, chunking counts the rest.
        """
        scratch = {k: DocHistory(dict(h.versions)) for k, h in histories.items()}
        to_chunk: list[list[Block]] = []
        for (_, ctx), prep in zip(items, prepared, strict=True):
            if isinstance(prep, Rejection):
                continue
            history = scratch.setdefault(prep.key, DocHistory())
            decision = decide(
                history,
                requested=prep.submission.doc_version,
                fingerprint=prep.fingerprint,
                event_id=ctx.event_id,
            )
            if isinstance(decision, Accept):
                history.versions[decision.version] = VersionRecord(
                    decision.version, "", prep.fingerprint, ctx.event_id, None, 0
                )
            if isinstance(decision, (Accept, Replay)):
                to_chunk.append(prep.parsed.blocks)
        measure = Measure(self.tokenizer)
        measure.prepare(to_chunk)
        return measure

    # -- events ---------------------------------------------------------------------------

    def _versions(self, event: DocumentSubmitted, profile: Profile | None) -> dict[str, str]:
        versions = dict(event.versions)
        # The submission time travels with the chunks, so index lag is measured end to end
        # (submitted → searchable) and stays the same when the log is replayed.
        versions.setdefault("submitted_at", str(int(event.occurred_at.timestamp() * 1000)))
        versions["chunker"] = CHUNKER_VERSION
        versions["tokenizer"] = self.tokenizer.model_id
        if profile is not None:
            versions["chunk_profile"] = (
                f"{profile.name}:{profile.max_tokens}/{profile.overlap_tokens}"
            )
        return versions

    def _chunked(
        self,
        event: DocumentSubmitted,
        ctx: Context,
        prep: Prepared,
        version: int,
        supersedes: int | None,
        measure: Measure | None = None,
    ) -> DocumentChunked | DocumentRejected:
        sub = prep.submission
        texts = chunk_blocks(prep.parsed.blocks, self.tokenizer, prep.profile, measure)
        size = sum(
            len(c.text.encode()) + _CHUNK_OVERHEAD + sum(len(p) + 8 for p in c.section_path)
            for c in texts
        )
        size += len(texts) * (
            sum(len(a) + 2 for a in sub.acl)
            + sum(len(k) + len(v) + 4 for k, v in sub.metadata.items())
            + len(prep.title)
        )
        if size > self.max_event_bytes:
            return self._rejected(
                event,
                ctx,
                Rejection(
                    "too_large",
                    f"the {len(texts)} chunks would make an event of {size / 1e6:.1f} MB "
                    f"(at most {self.max_event_bytes / 1e6:.1f} MB)",
                    "content",
                    "split the document, or shorten its title, ACL and metadata (every chunk "
                    "carries a copy)",
                ),
                content_hash=prep.content_hash,
            )
        # Built without re-validation: every value comes from validated input or from here.
        chunks = [
            Chunk.model_construct(
                chunk_id=chunk_id(sub.tenant, sub.doc_id, version, c.position),
                position=c.position,
                text=c.text,
                section_path=list(c.section_path),
                token_count=c.token_count,
                title=prep.title,
                version=version,
                knowledge_class=sub.knowledge_class,
                expires_at=sub.expires_at,
                acl=list(sub.acl),
                metadata=dict(sub.metadata),
            )
            for c in texts
        ]
        return DocumentChunked(
            event_id=ctx.derive_id(0),
            tenant=ctx.tenant,
            occurred_at=datetime.now(UTC),
            producer=ctx.service,
            doc_id=sub.doc_id,
            doc_version=version,
            versions=self._versions(event, prep.profile),
            content_hash=prep.content_hash,
            title=prep.title,
            knowledge_class=sub.knowledge_class,
            supersedes_version=supersedes,
            chunks=chunks,
        )

    def _rejected(
        self,
        event: DocumentSubmitted,
        ctx: Context,
        why: Rejection,
        *,
        content_hash: str | None = None,
        version: int | None = None,
    ) -> DocumentRejected:
        return DocumentRejected(
            event_id=ctx.derive_id(0),
            tenant=ctx.tenant,
            occurred_at=datetime.now(UTC),
            producer=ctx.service,
            doc_id=event.doc_id,
            doc_version=version if version is not None else event.doc_version,
            versions=self._versions(event, None),
            reason=why.reason,
            code=why.code,
            field=why.field,
            hint=why.hint,
            content_hash=content_hash,
        )


def _ms(value: datetime) -> int:
    return int(value.timestamp() * 1000)


def _stem(uri: str | None) -> str:
    if not uri:
        return ""
    name = PurePosixPath(uri.rstrip("/").split("?", 1)[0]).name
    return name.rsplit(".", 1)[0] if "." in name else name
