"""The audit hash chain: pure logic, no I/O (hashing, sealing, verification and diagnosis).

A chain is an ordered list of records (one chain per topic-partition, e.g. ``results/3``).
Record ``n`` stores its content (:class:`Entry`), ``prev`` — the hash of record ``n-1``, or
for the first record the chain's genesis (:func:`genesis`) or the anchor left by pruning —
and its own hash::

    hash(n) = SHA-256( DOMAIN ‖ prev ‖ 0x1e ‖ canonical(content) )        (hex)

``canonical`` joins the content fields in :data:`CONTENT_FIELDS` order with ``0x1f``, each as
Python's ``str()`` (ints in decimal, floats in their shortest round-trip form).  Every field
is NOT NULL and no string field can hold a control character (:func:`clean` strips them
when an entry is built; JSON fields escape them), so the encoding is unambiguous: two
different contents never join to the same bytes.  The record's position (``seq``) and row
id are deliberately *not* hashed: order is proven by the ``prev`` links, so a reordering
shows up as broken links rather than as altered contents.

**Seals.**  Each append batch is sealed with one Ed25519 signature by the audit identity:
the batch's record hashes plus a *head leaf* (:func:`head_leaf`: chain, seq and hash of
the new head) are the leaves of a Merkle tree (:func:`stratamesh.security.signing.sign_batch`,
the bus's batch signatures), so every record carries the signature and its own audit path
and stays checkable on its own.  The head leaf's seal is kept with the chain's head:
removing records at the tail is detected too.

**Verification** (:class:`Scanner`, or :func:`scan` for one call; then, only when something
is wrong, :func:`diagnose`) checks every record's link and recomputes its hash from its
stored fields; seals are checked a batch at a time: consecutive records under one signature
plus the head leaf rebuilt from the last of them must be exactly a sealed batch
(:func:`~stratamesh.security.signing.verify_batch`: one Ed25519 check, every record's seal
compared with its expected bytes).  Whatever is not a whole batch (one cut by pruning or a
range, or a tampered one) is checked record by record with
:func:`~stratamesh.security.signing.verify_record`, so a chain is accepted exactly when
every record's own seal verifies.  What is found wrong:
- *altered* — a record's content no longer hashes to its stored hash, or its hash was
  rewritten and its seal no longer verifies;
- *removed* — a record's ``prev`` is the hash of no record in the chain (its predecessor is
  gone), or the chain ends before its sealed head;
- *inserted* — a record whose neighbours link around it (forged, unsealed), or a second copy
  of another record;
- *reordered* — a record whose links to both neighbours are broken while its predecessor
  exists elsewhere in the chain (a swap names both records).

**Packed rows.**  The store reads records for verification as :data:`PACKED_FIELDS`: the
content already joined by the database (``pre``: the fields before ``cost_usd``, ``post``:
those after it, each rendered as its decimal or text form), and ``cost_usd`` — the one
float — rendered here with ``str()`` as when it was hashed.  Fewer, larger values per row
is what makes reading a chain cheap; :func:`pack` turns a :data:`ROW_FIELDS` row into the
same form.
"""

from __future__ import annotations

import hashlib
from binascii import hexlify
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any, Final

from stratamesh.errors import SecurityError
from stratamesh.security.keys import Keyring, SigningKey
from stratamesh.security.signing import (
    SignatureCache,
    sign_batch,
    verify_batch,
    verify_record,
)

__all__ = [
    "ALTERED",
    "CONTENT_FIELDS",
    "COST_AT",
    "INSERTED",
    "PACKED_FIELDS",
    "REMOVED",
    "REORDERED",
    "ROW_FIELDS",
    "Entry",
    "Finding",
    "Light",
    "ScanResult",
    "Scanner",
    "anchor_leaf",
    "canonical",
    "clean",
    "diagnose",
    "genesis",
    "head_leaf",
    "is_audit_signer",
    "lights_packed",
    "link",
    "pack",
    "record_hash",
    "scan",
    "seal",
    "text_of",
]

ALTERED: Final = "altered"
REMOVED: Final = "removed"
INSERTED: Final = "inserted"
REORDERED: Final = "reordered"

_DOMAIN: Final = b"strata-audit-record-v1\x00"
_GENESIS: Final = b"strata-audit-genesis-v1\x00"
_HEAD: Final = b"strata-audit-head-v1\x00"
_ANCHOR: Final = b"strata-audit-anchor-v1\x00"
_SEP: Final = "\x1f"
_PREV_SEP: Final = b"\x1e"
_AUDIT_SERVICE: Final = "audit"
# C0 controls and DEL: never inside a hashed string (see the module docstring).
_CONTROLS: Final = {c: None for c in (*range(0x20), 0x7F)}

# The hashed content of a record, in hashing order (the column names of the records table).
CONTENT_FIELDS: Final[tuple[str, ...]] = (
    "topic",
    "kafka_partition",
    "kafka_offset",
    "dedupe",
    "event_id",
    "event_type",
    "request_id",
    "doc_id",
    "tenant",
    "producer",
    "replay",
    "status",
    "occurred_ms",
    "recorded_ms",
    "model",
    "versions",
    "detail",
    "input_tokens",
    "output_tokens",
    "cost_usd",
    "billed",
    "event_hash",
)
# A stored record as verification reads it: id, seq, the content, prev, hash, signer, seal.
ROW_FIELDS: Final[tuple[str, ...]] = (
    "id",
    "seq",
    *CONTENT_FIELDS,
    "prev_hash",
    "hash",
    "signer",
    "seal",
)
_C0: Final = 2
_C1: Final = _C0 + len(CONTENT_FIELDS)
_PREV, _HASH, _SIGNER, _SEAL = _C1, _C1 + 1, _C1 + 2, _C1 + 3
# The one float of the content: the database joins the fields before and after it.
COST_AT: Final = CONTENT_FIELDS.index("cost_usd")
# A record as the fast verification path reads it (see "Packed rows" above); prev and hash
# as ASCII bytes, pre and post as UTF-8 bytes.
PACKED_FIELDS: Final[tuple[str, ...]] = (
    "seq",
    "prev_hash",
    "hash",
    "signer",
    "seal",
    "pre",
    "cost_usd",
    "post",
)
_SEP_B: Final = _SEP.encode()
_SEAL_HEAD: Final = 65  # version byte + Ed25519 signature: the same for a whole batch


def clean(text: str) -> str:
    """``text`` without control characters (what every hashed string field holds)."""
    return text.translate(_CONTROLS)


@dataclass(slots=True)
class Entry:
    """The content of one audit record: metadata and hashes of one event, never its text."""

    topic: str
    kafka_partition: int
    kafka_offset: int
    dedupe: str  # unique per topic: the event id (+ replay id), or the record for rejects
    event_id: str = ""
    event_type: str = ""
    request_id: str = ""
    doc_id: str = ""
    tenant: str = ""
    producer: str = ""
    replay: str = ""  # the strata-replay id of a replayed event ("" = live)
    status: str = "ok"  # "ok", or "rejected:<failure class>" for a record audit refused
    occurred_ms: int = 0  # the event's occurred_at (or the record's timestamp)
    recorded_ms: int = 0  # when audit appended it
    model: str = ""
    versions: str = "{}"  # canonical JSON
    detail: str = "{}"  # canonical JSON: verdicts, votes, scores, latencies ...
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0
    billed: int = 0  # 1 = counts in the cost ledger
    event_hash: str = ""  # SHA-256 hex of the record's value bytes

    def content(self) -> tuple[Any, ...]:
        return (
            self.topic,
            self.kafka_partition,
            self.kafka_offset,
            self.dedupe,
            self.event_id,
            self.event_type,
            self.request_id,
            self.doc_id,
            self.tenant,
            self.producer,
            self.replay,
            self.status,
            self.occurred_ms,
            self.recorded_ms,
            self.model,
            self.versions,
            self.detail,
            self.input_tokens,
            self.output_tokens,
            self.cost_usd,
            self.billed,
            self.event_hash,
        )

    def cleaned(self) -> Entry:
        """A copy whose string fields hold no control characters (and numbers their type)."""
        out = replace(self, cost_usd=float(self.cost_usd), billed=1 if self.billed else 0)
        for name in _STRING_FIELDS:
            setattr(out, name, clean(getattr(out, name)))
        return out


_STRING_FIELDS: Final = tuple(f.name for f in fields(Entry) if f.type in ("str", str))


def genesis(chain: str) -> str:
    """The ``prev`` of a chain's first record: binds the chain to its name."""
    return hashlib.sha256(_GENESIS + chain.encode()).hexdigest()


def canonical(content: Iterable[Any]) -> bytes:
    return _SEP.join(map(str, content)).encode()


def record_hash(prev: str, content: Iterable[Any]) -> str:
    return hashlib.sha256(
        _DOMAIN + prev.encode() + _PREV_SEP + _SEP.join(map(str, content)).encode()
    ).hexdigest()


def link(prev: str, entries: Sequence[Entry]) -> list[tuple[str, str]]:
    """``(prev, hash)`` of each entry appended in order after a record whose hash is ``prev``."""
    out = []
    for e in entries:
        h = record_hash(prev, e.content())
        out.append((prev, h))
        prev = h
    return out


def head_leaf(chain: str, seq: int, hash_: str) -> bytes:
    return hashlib.sha256(_HEAD + f"{chain}{_SEP}{seq}{_SEP}{hash_}".encode()).digest()


def anchor_leaf(chain: str, seq: int, hash_: str, pruned: int) -> bytes:
    text = f"{chain}{_SEP}{seq}{_SEP}{hash_}{_SEP}{pruned}"
    return hashlib.sha256(_ANCHOR + text.encode()).digest()


def seal(signer: SigningKey, leaves: Sequence[bytes]) -> list[bytes]:
    """One seal per leaf, all under one Ed25519 signature (see the module docstring)."""
    return sign_batch(signer, leaves)


def is_audit_signer(identity: str) -> bool:
    """Only the audit service's identities (``audit``, ``audit.<instance>``) may seal."""
    return identity == _AUDIT_SERVICE or identity.startswith(_AUDIT_SERVICE + ".")


def check_seal(
    keyring: Keyring, signer: str, leaf: bytes, seal_: bytes | None, cache: SignatureCache
) -> bool:
    if not is_audit_signer(signer):
        return False
    try:
        verify_record(keyring, signer, leaf, seal_, cache)
    except SecurityError:
        return False
    return True


@dataclass(frozen=True, slots=True)
class Finding:
    """One problem verification found, located: chain, position (seq) and row id."""

    kind: str  # ALTERED | REMOVED | INSERTED | REORDERED
    chain: str
    seq: int | None
    record_id: int | None
    detail: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "chain": self.chain,
            "seq": self.seq,
            "record_id": self.record_id,
            "detail": self.detail,
        }


@dataclass(slots=True)
class ScanResult:
    count: int = 0
    clean: bool = True
    last_seq: int | None = None
    last_hash: str | None = None
    batches: int = 0  # groups of records proven as one sealed batch
    singles: int = 0  # groups that were not a whole batch, proven record by record


def pack(row: Sequence[Any]) -> tuple[Any, ...]:
    """A :data:`ROW_FIELDS` row as ``(id, *PACKED_FIELDS)``, content rendered by ``str()``."""
    content = row[_C0:_C1]
    return (
        row[0],
        row[1],
        str(row[_PREV]).encode(),
        str(row[_HASH]).encode(),
        row[_SIGNER],
        row[_SEAL],
        _SEP.join(map(str, content[:COST_AT])).encode(),
        content[COST_AT],
        _SEP.join(map(str, content[COST_AT + 1 :])).encode(),
    )


def text_of(value: Any) -> str:
    """A text column as read: bytes (the fast readers) decoded one to one."""
    # latin-1 maps bytes to text one to one: tampered, non-ASCII hashes stay distinct.
    return value.decode("latin-1") if isinstance(value, bytes) else str(value)


class Scanner:
    """Checks a chain's :data:`PACKED_FIELDS` rows, in seq order, fed page by page.

    Per record: its link, and one SHA-256 over its stored content.  Seals: the records of
    one batch (same signer, same signature) are collected and, once the batch is complete,
    proven together (see the module docstring); a batch may span pages.  ``chain`` names
    the chain for its head leaves; without it every record's seal is checked on its own.
    :meth:`feed` and :meth:`finish` return False at the first problem (then :func:`diagnose`
    says what and where); ``result`` counts what was proven.
    """

    def __init__(
        self,
        chain: str | None,
        prev: str,
        keyring: Keyring,
        cache: SignatureCache,
        result: ScanResult,
    ) -> None:
        self.chain = chain
        self.keyring = keyring
        self.cache = cache
        self.result = result
        self._prev = prev.encode()
        self._key: tuple[Any, bytes] | None = None
        self._signer = ""
        # (seq, hash, leaf, seal) of the batch being collected
        self._group: list[tuple[int, bytes, bytes, bytes]] = []
        if result.last_hash is None:
            result.last_hash = prev

    def feed(self, rows: Iterable[Sequence[Any]]) -> bool:
        result = self.result
        if not result.clean:
            return False
        sha = hashlib.sha256
        domain, link, sep = _DOMAIN, _PREV_SEP, _SEP_B
        prev, key, group = self._prev, self._key, self._group
        add = group.append
        try:
            for seq, p, h, signer, seal, pre, cost, post in rows:
                if p != prev:
                    return self._fail()
                digest = sha(b"".join((domain, p, link, pre, sep, str(cost).encode(), sep, post)))
                leaf = digest.digest()
                if hexlify(leaf) != h:
                    return self._fail()
                if (signer, seal[:_SEAL_HEAD]) != key:
                    if group and not self._flush():
                        return False
                    key = (signer, seal[:_SEAL_HEAD])
                    name = signer.decode() if isinstance(signer, bytes) else signer
                    if not isinstance(name, str) or not is_audit_signer(name):
                        return self._fail()
                    self._key, self._signer = key, name
                add((seq, h, leaf, seal))
                prev = h
        except (TypeError, ValueError):  # a field of the wrong type: it cannot be the original
            return self._fail()
        finally:
            self._prev = prev
        return True

    def finish(self) -> bool:
        """Prove the last batch collected (call after the last page)."""
        if not self.result.clean:
            return False
        return not self._group or self._flush()

    def _fail(self) -> bool:
        self.result.clean = False
        return False

    def _flush(self) -> bool:
        result, group, signer = self.result, self._group, self._signer
        if self.chain is not None:
            seq, h = group[-1][0], group[-1][1]
            leaves = [g[2] for g in group]
            leaves.append(head_leaf(self.chain, seq, h.decode()))
            seals: list[bytes | None] = [g[3] for g in group]
            seals.append(None)  # the head leaf's seal was kept with the head of that time
            try:
                verify_batch(self.keyring, signer, leaves, seals, self.cache)
            except SecurityError:
                pass
            else:
                result.batches += 1
                result.count += len(group)
                result.last_seq, result.last_hash = seq, h.decode()
                group.clear()
                return True
        result.singles += 1
        for seq, h, leaf, seal in group:
            try:
                verify_record(self.keyring, signer, leaf, seal, self.cache)
            except (SecurityError, ValueError, TypeError):
                group.clear()
                return self._fail()
            result.count += 1
            result.last_seq, result.last_hash = seq, h.decode()
        group.clear()
        return True


def scan(
    rows: Iterable[Sequence[Any]],
    prev: str,
    keyring: Keyring,
    cache: SignatureCache,
    result: ScanResult,
    chain: str | None = None,
) -> bool:
    """Check :data:`ROW_FIELDS` rows (in seq order) continuing after a record whose hash is
    ``prev`` (``result.last_hash`` when called again for the next page): one
    :class:`Scanner` run over them.  Returns False at the first problem."""
    scanner = Scanner(chain, prev, keyring, cache, result)
    return scanner.feed(pack(row)[1:] for row in rows) and scanner.finish()


@dataclass(frozen=True, slots=True)
class Light:
    """What diagnosis needs of a record: where it is, its links, and whether it is sound."""

    id: int
    seq: int
    prev: str
    hash: str
    content_ok: bool  # the content hashes to the stored hash
    seal_ok: bool  # the stored hash is sealed by an audit identity

    @property
    def ok(self) -> bool:
        return self.content_ok and self.seal_ok


def lights(rows: Iterable[Sequence[Any]], keyring: Keyring, cache: SignatureCache) -> list[Light]:
    """The :class:`Light` of every row (:data:`ROW_FIELDS`)."""
    out = []
    for row in rows:
        h, p = row[_HASH], row[_PREV]
        content_ok = record_hash(p, row[_C0:_C1]) == h
        try:
            leaf = bytes.fromhex(h)
        except (ValueError, TypeError):
            seal_ok = False
        else:
            seal_ok = check_seal(keyring, row[_SIGNER], leaf, row[_SEAL], cache)
        out.append(Light(row[0], row[1], p, h, content_ok, seal_ok))
    return out


def lights_packed(
    rows: Iterable[Sequence[Any]], keyring: Keyring, cache: SignatureCache
) -> list[Light]:
    """The :class:`Light` of every ``(id, *PACKED_FIELDS)`` row: the same content check as
    :class:`Scanner`, each seal checked on its own."""
    out = []
    sha = hashlib.sha256
    for rid, seq, p, h, signer, seal, pre, cost, post in rows:
        try:
            message = b"".join(
                (_DOMAIN, p, _PREV_SEP, pre, _SEP_B, str(cost).encode(), _SEP_B, post)
            )
            content_ok = hexlify(sha(message).digest()) == h
        except TypeError:
            content_ok = False
        try:
            leaf = bytes.fromhex(text_of(h))
            name = signer.decode() if isinstance(signer, bytes) else signer
        except ValueError:
            seal_ok = False
        else:
            seal_ok = check_seal(keyring, name, leaf, seal, cache)
        out.append(Light(rid, seq, text_of(p), text_of(h), content_ok, seal_ok))
    return out


@dataclass(frozen=True, slots=True)
class Head:
    """A chain's sealed head, or the anchor a prune left (the chain's verified start)."""

    seq: int
    hash: str


def diagnose(
    chain: str,
    rows: Sequence[Light],
    start: Head,
    head: Head | None,
) -> list[Finding]:
    """Every problem of a chain and where it is (rows in seq order).

    ``start`` is the anchor (or genesis at seq 0) the first row must follow; ``head`` the
    sealed head the last row must be (None: do not check the tail, e.g. a range).
    """
    findings: list[Finding] = []
    n = len(rows)
    if n == 0:
        if head is not None and head.seq > start.seq:
            findings.append(
                Finding(
                    REMOVED,
                    chain,
                    start.seq + 1,
                    None,
                    f"every record is missing: the sealed head is seq {head.seq}",
                )
            )
        return findings

    def pred_hash(i: int) -> str:
        return rows[i - 1].hash if i > 0 else start.hash

    def pred_seq(i: int) -> int:
        return rows[i - 1].seq if i > 0 else start.seq

    def where(i: int) -> str:
        r = rows[i]
        return f"record {r.id} (seq {r.seq})"

    in_ok = [rows[i].prev == pred_hash(i) for i in range(n)]
    positions: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        positions.setdefault(r.hash, []).append(i)
    referenced = {r.prev for r in rows}

    def out_ok(i: int) -> bool:
        if i + 1 < n:
            return in_ok[i + 1]
        return rows[i].hash not in referenced

    explained: set[int] = set()
    for i, r in enumerate(rows):
        if r.ok:
            continue
        explained.add(i)
        skipped_by_next = i + 1 < n and rows[i + 1].prev == pred_hash(i)
        after_head = i + 1 == n and head is not None and head.hash == pred_hash(i)
        if skipped_by_next or after_head:
            findings.append(
                Finding(
                    INSERTED,
                    chain,
                    r.seq,
                    r.id,
                    f"{where(i)} is not part of the chain: its neighbours link around it"
                    + ("" if r.seal_ok else " and it carries no valid audit seal"),
                )
            )
            explained.add(i + 1)
        else:
            what = (
                "its content no longer matches its hash"
                if not r.content_ok
                else "its hash was rewritten (the audit seal no longer verifies)"
            )
            findings.append(Finding(ALTERED, chain, r.seq, r.id, f"{where(i)} was altered: {what}"))
            explained.add(i + 1)  # the next record's link to the original hash breaks too
    for i, r in enumerate(rows):
        if in_ok[i] or i in explained:
            continue
        found = positions.get(r.prev)
        if found:
            copies = positions[r.hash]
            if len(copies) > 1 and copies[0] != i:
                first = rows[copies[0]]
                findings.append(
                    Finding(
                        INSERTED,
                        chain,
                        r.seq,
                        r.id,
                        f"{where(i)} is a copy of record {first.id} (seq {first.seq})",
                    )
                )
            elif not out_ok(i):
                before = rows[found[0]]
                findings.append(
                    Finding(
                        REORDERED,
                        chain,
                        r.seq,
                        r.id,
                        f"{where(i)} is out of order: it follows record {before.id} "
                        f"(seq {before.seq}), not the record before it",
                    )
                )
            # else: the successor of a moved record; the moved record is reported
            continue
        gap = r.seq - pred_seq(i) - 1
        span = f"{gap} record(s) (seq {pred_seq(i) + 1}..{r.seq - 1})" if gap > 0 else "record(s)"
        after = where(i - 1) if i > 0 else "the chain's start"
        findings.append(
            Finding(
                REMOVED,
                chain,
                pred_seq(i) + 1 if gap > 0 else r.seq,
                r.id,
                f"{span} removed between {after} and {where(i)}: the predecessor "
                f"{r.prev[:12]}… that {where(i)} links to is missing",
            )
        )
    if head is not None:
        last = rows[-1]
        if last.hash != head.hash and head.hash not in positions:
            missing = head.seq - last.seq
            findings.append(
                Finding(
                    REMOVED,
                    chain,
                    last.seq + 1,
                    None,
                    f"{missing if missing > 0 else 'some'} record(s) removed at the end, after "
                    f"record {last.id} (seq {last.seq}); the sealed head is seq {head.seq}",
                )
            )
    findings.sort(key=lambda f: (f.seq if f.seq is not None else -1, f.kind))
    return findings
