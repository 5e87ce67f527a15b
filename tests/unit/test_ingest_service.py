"""The ingest service in the in-memory harness: outcomes, versions, rejections, redelivery."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from stratamesh.bus import topics as T
from stratamesh.bus.middleware import Handled
from stratamesh.bus.testing import MemoryMesh
from stratamesh.config import ChunkSettings, Settings
from stratamesh.events import (
    ContentType,
    DocumentChunked,
    DocumentRejected,
    DocumentSubmitted,
    KnowledgeClass,
    derived_event_id,
    new_event_id,
)
from stratamesh.services.ingest.app import IngestService
from stratamesh.services.ingest.chunking import chunk_id
from stratamesh.services.ingest.validate import Policy
from stratamesh.stores.idempotency import MemoryIdempotency
from tests.unit.test_chunking import model_tokens

GUIDE = (
    "# Guide\n\nStrata ingests documents. It chunks them by structure.\n\n"
    "## Tables\n\n| k | v |\n|---|---|\n| a | 1 |\n"
)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    # Unit tests keep state in their own folder, even where STRATA_REDIS_URL is set.
    return Settings(home=tmp_path / "home", redis_url=None)


class Harness:
    def __init__(self, settings: Settings, policy: Policy | None = None) -> None:
        self.service = IngestService(policy=policy)
        self.mesh = MemoryMesh(self.service, settings=settings)
        self.client = self.mesh.client("web", tenant="acme")

    def doc(self, **kw: Any) -> DocumentSubmitted:
        fields: dict[str, Any] = {
            "event_id": new_event_id(),
            "tenant": "spoofed",  # the client key's tenant wins
            "occurred_at": datetime.now(UTC),
            "producer": self.client,
            "doc_id": "guide",
            "content": GUIDE,
            "content_type": ContentType.MARKDOWN,
        }
        fields.update(kw)
        return DocumentSubmitted(**fields)

    async def submit(self, *docs: DocumentSubmitted, as_: str | None = None) -> None:
        for d in docs:
            await self.mesh.publish(d, as_=as_ or self.client)
        await self.mesh.run_until_idle()

    @property
    def chunked(self) -> list[DocumentChunked]:
        return [e for e in self.mesh.events(T.DOCS_CHUNKED) if isinstance(e, DocumentChunked)]

    @property
    def rejected(self) -> list[DocumentRejected]:
        return [e for e in self.mesh.events(T.DOCS_REJECTED) if isinstance(e, DocumentRejected)]


async def test_a_document_becomes_chunks_with_version_class_title_and_tenant(
    settings: Settings,
) -> None:
    h = Harness(settings)
    doc = h.doc(acl=["team-a"], metadata={"lang": "en"})
    await h.submit(doc)
    [out] = h.chunked
    assert out.event_id == derived_event_id(doc.event_id, "ingest", 0)
    assert (out.tenant, out.doc_id, out.doc_version, out.supersedes_version) == (
        "acme",
        "guide",
        1,
        None,
    )
    assert out.title == "Guide" and out.knowledge_class == KnowledgeClass.ANCHORED
    assert out.versions["chunker"] and out.versions["tokenizer"].endswith("all-MiniLM-L6-v2")
    assert len(out.content_hash) == 64
    assert [c.section_path for c in out.chunks] == [["Guide"], ["Guide", "Tables"]]
    for c in out.chunks:
        assert c.chunk_id == chunk_id("acme", "guide", 1, c.position)
        assert c.token_count == model_tokens(c.text) <= 512
        assert (c.title, c.version, c.acl, c.metadata) == ("Guide", 1, ["team-a"], {"lang": "en"})
        assert c.expires_at is None and c.knowledge_class == KnowledgeClass.ANCHORED
    assert "| a | 1 |" in out.chunks[1].text
    assert h.rejected == []


async def test_identical_resubmission_is_unchanged_and_a_change_supersedes(
    settings: Settings,
) -> None:
    h = Harness(settings)
    await h.submit(h.doc())
    # Same structure and text; only presentation differs (line ends, emphasis).
    await h.submit(h.doc(content=GUIDE.replace("\n", "\r\n").replace("Strata", "*Strata*")))
    assert len(h.chunked) == 1
    [same] = h.rejected
    assert (same.code, same.doc_version, same.field) == ("unchanged", 1, None)
    assert same.content_hash == h.chunked[0].content_hash and same.hint
    await h.submit(h.doc(content=GUIDE + "\nA new paragraph.\n"))
    v2 = h.chunked[-1]
    assert (v2.doc_version, v2.supersedes_version) == (2, 1)
    assert {c.version for c in v2.chunks} == {2}
    assert not {c.chunk_id for c in v2.chunks} & {c.chunk_id for c in h.chunked[0].chunks}
    # A change of ACL alone is a new version too: the new ACL must reach the index.
    await h.submit(h.doc(content=GUIDE + "\nA new paragraph.\n", acl=["admins"]))
    assert (h.chunked[-1].doc_version, h.chunked[-1].chunks[0].acl) == (3, ["admins"])


async def test_anchored_versions_are_pinned(settings: Settings) -> None:
    h = Harness(settings)
    await h.submit(h.doc(doc_version=3))
    assert h.chunked[-1].doc_version == 3 and h.chunked[-1].supersedes_version is None
    await h.submit(h.doc(doc_version=3, content=GUIDE + "\nchanged\n"))
    await h.submit(h.doc(doc_version=2, content=GUIDE + "\nolder\n"))
    await h.submit(h.doc(doc_version=3))
    codes = [(r.code, r.field, r.doc_version) for r in h.rejected]
    assert codes == [
        ("version_conflict", "doc_version", 3),
        ("stale_version", "doc_version", 2),
        ("unchanged", None, 3),
    ]
    assert all(r.reason and r.hint for r in h.rejected)
    await h.submit(h.doc(doc_version=7, content=GUIDE + "\nchanged\n"))
    assert (h.chunked[-1].doc_version, h.chunked[-1].supersedes_version) == (7, 3)
    await h.submit(h.doc(content=GUIDE + "\nagain\n"))
    assert h.chunked[-1].doc_version == 8


async def test_fluid_documents_carry_an_expiry(settings: Settings) -> None:
    h = Harness(settings)
    now = datetime.now(UTC).replace(microsecond=0)
    soon = now + timedelta(days=2)
    await h.submit(h.doc(doc_id="news", expires_at=soon, occurred_at=now))
    await h.submit(h.doc(doc_id="feed", knowledge_class=KnowledgeClass.FLUID, occurred_at=now))
    news, feed = h.chunked
    assert news.knowledge_class == KnowledgeClass.FLUID  # an expiry makes it fluid
    assert {c.expires_at for c in news.chunks} == {soon}
    # A fluid document without expiry gets the default time to live.
    assert {c.expires_at for c in feed.chunks} == {now + timedelta(days=30)}
    # Re-submitting it later is still "unchanged": the default expiry is not content.
    await h.submit(h.doc(doc_id="feed", knowledge_class=KnowledgeClass.FLUID))
    assert [r.code for r in h.rejected] == ["unchanged"]


@pytest.mark.parametrize(
    ("overrides", "code", "field"),
    [
        ({"content": ""}, "empty", "content"),
        ({"content": "  \n\t "}, "empty", "content"),
        ({"content": "x" * 2_000}, "too_large", "content"),
        ({"content": "abc\x00def"}, "undecodable", "content"),
        ({"content": "\ufffd" * 50 + "text"}, "undecodable", "content"),
        ({"doc_id": " "}, "invalid", "doc_id"),
        ({"doc_id": "a\nb"}, "invalid", "doc_id"),
        ({"doc_version": 0}, "invalid", "doc_version"),
        ({"acl": ["ok", " "]}, "invalid", "acl"),
        ({"chunk_profile": "nope"}, "unsupported", "chunk_profile"),
        ({"title": "t" * 5_000}, "invalid", "title"),
        (
            {
                "knowledge_class": KnowledgeClass.FLUID,
                "expires_at": datetime(2020, 1, 1, tzinfo=UTC),
            },
            "expired",
            "expires_at",
        ),
        (
            {"knowledge_class": KnowledgeClass.ANCHORED, "doc_version": None},
            "version_required",
            "doc_version",
        ),
        (
            {"content": "<script>x()</script><style>p{}</style>", "content_type": ContentType.HTML},
            "empty",
            "content",
        ),
        (
            {"content": '{"_id": "1", "text": "a"}\n{broken', "content_type": ContentType.JSONL},
            "invalid",
            "content",
        ),
    ],
)
async def test_invalid_documents_are_rejected_with_field_reason_and_hint(
    settings: Settings, overrides: dict[str, Any], code: str, field: str
) -> None:
    h = Harness(settings, Policy(max_content_bytes=1_000, require_anchored_version=True))
    doc = h.doc(**{"doc_version": 1, **overrides})
    await h.submit(doc)
    assert h.chunked == []
    [rej] = h.rejected
    assert (rej.code, rej.field) == (code, field), rej.reason
    assert rej.reason and rej.hint
    assert rej.event_id == derived_event_id(doc.event_id, "ingest", 0)
    assert (rej.tenant, rej.doc_id) == ("acme", doc.doc_id)
    assert not h.mesh.topics[T.dlq_of(T.DOCS_SUBMITTED)]  # a result, never a crash


async def test_several_problems_are_all_named(settings: Settings) -> None:
    h = Harness(settings)
    await h.submit(h.doc(doc_id="", content=""))
    [rej] = h.rejected
    assert rej.field == "doc_id" and "content" in rej.reason


async def test_tenants_never_share_documents_or_chunk_ids(settings: Settings) -> None:
    h = Harness(settings)
    other = h.mesh.client("rival", tenant="globex")
    await h.submit(h.doc())
    await h.submit(h.doc(producer=other), as_=other)
    acme, globex = h.chunked
    assert (acme.tenant, globex.tenant) == ("acme", "globex")
    assert acme.doc_version == globex.doc_version == 1  # separate histories
    assert not {c.chunk_id for c in acme.chunks} & {c.chunk_id for c in globex.chunks}


async def test_two_versions_in_one_batch_are_numbered_in_order(settings: Settings) -> None:
    h = Harness(settings)
    docs = [h.doc(content=GUIDE + f"\nrevision {i}\n") for i in range(3)] + [h.doc()]
    await h.submit(*docs)  # one batch: the harness delivers pending records together
    assert [(c.doc_version, c.supersedes_version) for c in h.chunked] == [
        (1, None),
        (2, 1),
        (3, 2),
        (4, 3),
    ]


async def test_redelivery_after_the_state_was_written_yields_the_same_output(
    settings: Settings,
) -> None:
    h = Harness(settings)
    await h.submit(h.doc())
    [first] = h.chunked
    [record] = h.mesh.topics[T.DOCS_SUBMITTED]
    # A restarted instance that never marked the record as handled (crash after produce,
    # before commit): fresh dedupe memory, the same state file.
    pipeline = h.service.build_pipeline(
        settings, keyring=h.mesh.keyring, idempotency=MemoryIdempotency(), codec=h.mesh.codec
    )
    [(_, outcome)] = await pipeline.process([record])
    assert isinstance(outcome, Handled)
    [out] = outcome.outputs
    again = h.mesh.codec.decode(out.value or b"")
    assert isinstance(again, DocumentChunked)
    assert again.event_id == first.event_id  # the next stage drops it as a duplicate
    assert (again.doc_version, again.supersedes_version) == (1, None)
    assert [c.chunk_id for c in again.chunks] == [c.chunk_id for c in first.chunks]
    # ... and the state was not advanced: a genuine re-submission is still "unchanged".
    await h.submit(h.doc())
    assert [r.code for r in h.rejected] == ["unchanged"]


async def test_chunk_profiles_by_content_type_and_by_name(tmp_path: Path) -> None:
    settings = Settings(
        home=tmp_path,
        redis_url=None,
        chunk=ChunkSettings(profiles={"markdown": (64, 16), "tiny": (32, 0)}),
    )
    h = Harness(settings)
    long = "# Notes\n\n" + " ".join(f"Fact {i} is worth a sentence of its own." for i in range(40))
    await h.submit(h.doc(doc_id="md", content=long))
    await h.submit(h.doc(doc_id="tiny", content=long, chunk_profile="tiny"))
    await h.submit(h.doc(doc_id="txt", content=long, content_type=ContentType.TEXT))
    md, tiny, txt = h.chunked
    assert md.versions["chunk_profile"] == "markdown:64/16"
    assert max(c.token_count for c in md.chunks) <= 64 and len(md.chunks) > 5
    assert tiny.versions["chunk_profile"] == "tiny:32/0"
    assert max(c.token_count for c in tiny.chunks) <= 32
    assert txt.versions["chunk_profile"] == "default:512/128" and len(txt.chunks) == 1
