"""The audit hash chain (pure): linking, seals, and locating every kind of tampering."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from stratamesh.audit import chain as C
from stratamesh.errors import SecurityError, SignatureError
from stratamesh.security.keys import Keyring, SigningKey, generate_identity
from stratamesh.security.signing import SignatureCache, sign_batch, verify_batch, verify_record

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


# -- seals checked a batch at a time --------------------------------------------------------


def scan_all(rows: list[list[Any]], keyring: Keyring, pages: int = 1) -> C.ScanResult:
    """One Scanner over ``rows`` fed in ``pages`` pieces, as the store does."""
    result = C.ScanResult()
    scanner = C.Scanner(CHAIN, C.genesis(CHAIN), keyring, SignatureCache(), result)
    size = -(-len(rows) // pages)
    for start in range(0, len(rows), size):
        if not scanner.feed(C.pack(r)[1:] for r in rows[start : start + size]):
            return result
    scanner.finish()
    return result


def test_whole_batches_are_proven_as_batches_even_across_pages(
    keys: tuple[SigningKey, Keyring],
) -> None:
    key, keyring = keys
    rows, head = build(key, 40, batch=8)
    for pages in (1, 3, 7):
        result = scan_all(rows, keyring, pages)
        assert result.clean and result.count == 40 and result.last_hash == head.hash
        assert (result.batches, result.singles) == (5, 0)


def test_a_batch_cut_short_is_proven_record_by_record(keys: tuple[SigningKey, Keyring]) -> None:
    key, keyring = keys
    rows, head = build(key, 20, batch=7)
    # What a prune in the middle of a batch (or a range starting there) leaves to check.
    result = C.ScanResult()
    after = rows[2][C.ROW_FIELDS.index("hash")]
    scanner = C.Scanner(CHAIN, after, keyring, SignatureCache(), result)
    assert scanner.feed(C.pack(r)[1:] for r in rows[3:]) and scanner.finish()
    assert (result.count, result.batches, result.singles) == (17, 2, 1)
    assert result.last_hash == head.hash


def test_a_tampered_leaf_fails_only_its_batch_and_is_named(
    keys: tuple[SigningKey, Keyring],
) -> None:
    key, keyring = keys
    rows, head = build(key, 32, batch=8)
    i = 31  # the last record (its link stays intact): content changed, hash recomputed
    rows[i][C.ROW_FIELDS.index("cost_usd")] = 0.0
    prev = rows[i][C.ROW_FIELDS.index("prev_hash")]
    content = rows[i][2 : 2 + len(C.CONTENT_FIELDS)]
    rows[i][C.ROW_FIELDS.index("hash")] = C.record_hash(prev, content)
    result = scan_all(rows, keyring)
    # Every link and content hash holds, but the last batch is no longer what was sealed:
    # the three before it were proven whole, its records one by one up to the forged one.
    assert not result.clean and (result.batches, result.singles) == (3, 1)
    assert result.count == 31 and result.last_seq == 31
    lights = C.lights(rows, keyring, SignatureCache())
    [f] = C.diagnose(CHAIN, lights, C.Head(0, C.genesis(CHAIN)), None)  # the tail aside
    assert (f.kind, f.record_id, f.seq) == (C.ALTERED, 32, 32) and "seal" in f.detail
    assert head.seq == 32


def test_verify_batch_accepts_exactly_the_batch_that_was_signed(
    keys: tuple[SigningKey, Keyring],
) -> None:
    key, keyring = keys
    for n in (1, 2, 3, 5, 8, 13, 64, 65):
        leaves = [bytes([i % 256]) * 32 for i in range(n)]
        seals = sign_batch(key, leaves)
        verify_batch(keyring, "audit", leaves, seals)
        if n > 1:  # a header kept elsewhere (the chain's head) is not needed
            verify_batch(keyring, "audit", leaves, [*seals[:-1], None])
            forged = [*leaves[:-1], b"\xee" * 32]
            for bad_leaves, bad_seals in (
                (forged, seals),  # a leaf changed
                (leaves[1:], seals[1:]),  # a leaf missing
                (leaves[::-1], seals[::-1]),  # order changed
            ):
                with pytest.raises(SignatureError):
                    verify_batch(keyring, "audit", bad_leaves, bad_seals)
            bent = bytearray(seals[0])
            bent[-1] ^= 1  # one byte of one audit path
            with pytest.raises(SignatureError):
                verify_batch(keyring, "audit", leaves, [bytes(bent), *seals[1:]])
        with pytest.raises(SecurityError):  # another producer's key
            verify_batch(keyring, "guard", leaves, seals)
    leaves = [bytes([i]) * 32 for i in range(9)]
    seals = sign_batch(key, leaves)
    cache = SignatureCache()
    verify_batch(keyring, "audit", leaves, seals, cache)
    for leaf, seal in zip(leaves, seals, strict=True):  # each still checkable on its own
        verify_record(keyring, "audit", leaf, seal, cache)
