"""The audit hash chain (pure): linking, seals, and locating every kind of tampering."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from stratamesh.audit import chain as C
from stratamesh.security.keys import Keyring, SigningKey, generate_identity
from stratamesh.security.signing import SignatureCache

CHAIN = "results/0"


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[SigningKey, Keyring]:
    folder: Path = tmp_path_factory.mktemp("keys")
    key = generate_identity(folder, "audit")
    generate_identity(folder, "guard")
    return key, Keyring.load(folder)


def entry(i: int, **kw: Any) -> C.Entry:
    fields: dict[str, Any] = {
        "topic": "results",
        "kafka_partition": 0,
        "kafka_offset": i,
        "dedupe": f"event-{i}",
        "event_id": f"event-{i}",
        "event_type": "RequestCompleted",
        "request_id": f"req-{i % 3}",
        "tenant": "acme",
        "producer": "guard",
        "occurred_ms": 1_700_000_000_000 + i,
        "recorded_ms": 1_700_000_000_500 + i,
        "detail": '{"status":"ok"}',
        "input_tokens": i,
        "output_tokens": 2 * i,
        "cost_usd": i / 1000,
    }
    fields.update(kw)
    return C.Entry(**fields)


def build(key: SigningKey, n: int, batch: int = 4) -> tuple[list[list[Any]], C.Head]:
    """Rows (ROW_FIELDS) of a chain of ``n`` records appended in batches, and its head."""
    rows: list[list[Any]] = []
    prev, seq = C.genesis(CHAIN), 0
    for start in range(0, n, batch):
        entries = [entry(i) for i in range(start, min(n, start + batch))]
        links = C.link(prev, entries)
        last_seq = seq + len(entries)
        seals = C.seal(
            key, [bytes.fromhex(h) for _, h in links] + [C.head_leaf(CHAIN, last_seq, links[-1][1])]
        )
        for e, (p, h), s in zip(entries, links, seals, strict=False):
            seq += 1
            rows.append([seq, seq, *e.content(), p, h, key.identity, s])
        prev = links[-1][1]
    return rows, C.Head(seq, prev)


def check(rows: list[list[Any]], head: C.Head, keyring: Keyring) -> list[C.Finding]:
    cache = SignatureCache()
    result = C.ScanResult()
    if C.scan(rows, C.genesis(CHAIN), keyring, cache, result) and result.last_hash == head.hash:
        return []
    return C.diagnose(CHAIN, C.lights(rows, keyring, cache), C.Head(0, C.genesis(CHAIN)), head)


def kinds(findings: list[C.Finding]) -> list[tuple[str, int | None]]:
    return [(f.kind, f.record_id) for f in findings]


def test_an_untouched_chain_verifies(keys: tuple[SigningKey, Keyring]) -> None:
    key, keyring = keys
    rows, head = build(key, 23)
    result = C.ScanResult()
    assert C.scan(rows, C.genesis(CHAIN), keyring, SignatureCache(), result)
    assert result.count == 23 and result.last_hash == head.hash and result.last_seq == 23
    assert check(rows, head, keyring) == []


def test_the_hash_covers_every_content_field_and_the_link() -> None:
    base = entry(1)
    h = C.record_hash("p" * 64, base.content())
    assert C.record_hash("q" * 64, base.content()) != h
    for name in C.CONTENT_FIELDS:
        value = getattr(base, name)
        other = value + 1 if isinstance(value, int | float) else value + "x"
        changed = C.Entry(**{f: getattr(base, f) for f in C.CONTENT_FIELDS})
        setattr(changed, name, other)
        assert C.record_hash("p" * 64, changed.content()) != h, name


def test_cleaned_entries_hold_no_separator_so_fields_cannot_shift() -> None:
    a = entry(1, tenant="ac\x1fme", model="m\x00").cleaned()
    assert a.tenant == "acme" and a.model == "m"
    # Without cleaning, moving a separator between two fields would keep the hash.
    x = C.record_hash("p", entry(1, tenant="a\x1fb", producer="c").content())
    y = C.record_hash("p", entry(1, tenant="a", producer="b\x1fc").content())
    assert x == y  # which is exactly why every string is cleaned before it is hashed
    assert entry(1, tenant="a\x1fb").cleaned().tenant != entry(1, tenant="a").cleaned().tenant


def test_an_altered_field_is_found_and_named(keys: tuple[SigningKey, Keyring]) -> None:
    key, keyring = keys
    rows, head = build(key, 12)
    rows[6][C.ROW_FIELDS.index("cost_usd")] = 0.0  # record 7: cheaper after the fact
    assert kinds(check(rows, head, keyring)) == [(C.ALTERED, 7)]


def test_an_altered_record_whose_hash_was_recomputed_is_found(
    keys: tuple[SigningKey, Keyring],
) -> None:
    key, keyring = keys
    rows, head = build(key, 12)
    i = 4
    rows[i][C.ROW_FIELDS.index("tenant")] = "other"
    prev = rows[i][C.ROW_FIELDS.index("prev_hash")]
    content = rows[i][2 : 2 + len(C.CONTENT_FIELDS)]
    rows[i][C.ROW_FIELDS.index("hash")] = C.record_hash(prev, content)
    [f] = check(rows, head, keyring)
    assert (f.kind, f.record_id, f.seq) == (C.ALTERED, 5, 5) and "seal" in f.detail


def test_a_deleted_record_is_found_and_located(keys: tuple[SigningKey, Keyring]) -> None:
    key, keyring = keys
    rows, head = build(key, 12)
    del rows[5]  # seq 6
    [f] = check(rows, head, keyring)
    assert f.kind == C.REMOVED and f.seq == 6 and f.record_id == 7
    assert "record 5" in f.detail and "record 7" in f.detail


def test_records_deleted_at_the_end_are_found_from_the_sealed_head(
    keys: tuple[SigningKey, Keyring],
) -> None:
    key, keyring = keys
    rows, head = build(key, 12)
    [f] = check(rows[:-2], head, keyring)
    assert f.kind == C.REMOVED and f.seq == 11 and "2 record(s)" in f.detail


def test_two_swapped_records_are_both_named(keys: tuple[SigningKey, Keyring]) -> None:
    key, keyring = keys
    rows, head = build(key, 12)
    seq = C.ROW_FIELDS.index("seq")
    rows[3], rows[4] = rows[4], rows[3]  # positions 4 and 5 exchange their records
    rows[3][seq], rows[4][seq] = 4, 5
    assert sorted(kinds(check(rows, head, keyring))) == [(C.REORDERED, 4), (C.REORDERED, 5)]


def test_a_record_moved_far_away_is_named(keys: tuple[SigningKey, Keyring]) -> None:
    key, keyring = keys
    rows, head = build(key, 12)
    rows.append(rows.pop(2))  # record 3 now sits at the end
    assert kinds(check(rows, head, keyring)) == [(C.REORDERED, 3)]


def test_an_inserted_forged_record_is_found(keys: tuple[SigningKey, Keyring]) -> None:
    key, keyring = keys
    rows, head = build(key, 12)
    before = rows[6]
    forged = entry(99, tenant="acme", cost_usd=0.0)
    prev = before[C.ROW_FIELDS.index("hash")]
    h = C.record_hash(prev, forged.content())
    rows.insert(7, [999, 7, *forged.content(), prev, h, "audit", b"\x01" + b"\x00" * 64])
    assert kinds(check(rows, head, keyring)) == [(C.INSERTED, 999)]


def test_an_inserted_copy_of_a_real_record_is_found(keys: tuple[SigningKey, Keyring]) -> None:
    key, keyring = keys
    rows, head = build(key, 12)
    copy = list(rows[2])
    copy[0] = 1000
    rows.insert(8, copy)
    found = check(rows, head, keyring)
    assert kinds(found) == [(C.INSERTED, 1000)] and "copy of record 3" in found[0].detail


def test_a_seal_by_another_service_is_refused(keys: tuple[SigningKey, Keyring]) -> None:
    key, keyring = keys
    rows, head = build(key, 4)
    rows[1][C.ROW_FIELDS.index("signer")] = "guard"
    assert kinds(check(rows, head, keyring)) == [(C.ALTERED, 2)]


def test_scan_pages_continue_from_the_last_hash(keys: tuple[SigningKey, Keyring]) -> None:
    key, keyring = keys
    rows, head = build(key, 20, batch=7)
    result, cache = C.ScanResult(), SignatureCache()
    prev = C.genesis(CHAIN)
    for page in (rows[:9], rows[9:15], rows[15:]):
        assert C.scan(page, prev, keyring, cache, result)
        assert result.last_hash is not None
        prev = result.last_hash
    assert result.count == 20 and prev == head.hash
