"""Record signatures: Ed25519 over a Merkle root of the records a producer sends together.

Every record is signed, but Ed25519 costs ~40 µs to sign and ~100 µs to verify on the
machines we target — more than the whole broker hop per message.  So a producer signs the
records it flushes in one event-loop turn as a batch: each record becomes a Merkle leaf,
the producer signs the root once, and each record carries the signature plus its own
audit path.  A record stays verifiable on its own (the DLQ, redrive, replay and audit rely
on that); a consumer that meets the same root again — the rest of the batch — skips the
Ed25519 check through a small cache.  A batch of one is an ordinary signature.

A leaf covers the record's key, value and the :data:`~stratamesh.bus.headers.SIGNED_HEADERS`
(absent and empty headers are distinguished).  Header wire format (``strata-signature``)::

    0x01 | signature (64) | n × (side (1) | sibling hash (32))
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict
from collections.abc import Mapping, Sequence

from stratamesh.bus.headers import SIGNED_HEADERS
from stratamesh.errors import SignatureError
from stratamesh.security.keys import Keyring, SigningKey

__all__ = [
    "MAX_BATCH",
    "SignatureCache",
    "leaf_hash",
    "sign_batch",
    "verify_batch",
    "verify_record",
]

_VERSION = 1
_LEAF = b"\x00strata-leaf-v1"
_NODE = b"\x01"
_ROOT = b"strata-root-v1"
_LEFT, _RIGHT = 0, 1
_LEFT_STEP, _RIGHT_STEP = bytes([_LEFT]), bytes([_RIGHT])
_SIG_LEN = 64
_STEP = 33
_LEN = struct.Struct(">I")
_ABSENT = b"\xff\xff\xff\xff"
# Records signed under one root at most: bounds the audit path (33 bytes a level) that every
# record carries, at the cost of one Ed25519 signature per this many records.
MAX_BATCH = 64


def leaf_hash(key: bytes | None, value: bytes, headers: Mapping[str, bytes]) -> bytes:
    parts = [_LEAF]
    append, pack = parts.append, _LEN.pack
    for part in (key, value, *[headers.get(name) for name in SIGNED_HEADERS]):
        if part is None:
            append(_ABSENT)
        else:
            append(pack(len(part)))
            append(part)
    return hashlib.sha256(b"".join(parts)).digest()


def _node(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(_NODE + left + right).digest()


def sign_batch(signer: SigningKey, leaves: Sequence[bytes]) -> list[bytes]:
    """One ``strata-signature`` header value per leaf, all under one Ed25519 signature."""
    if not leaves:
        return []
    paths: list[bytearray] = [bytearray() for _ in leaves]
    # members[i] = indices of the leaves under node i of the current level
    level = list(leaves)
    members: list[list[int]] = [[i] for i in range(len(leaves))]
    while len(level) > 1:
        nxt: list[bytes] = []
        nxt_members: list[list[int]] = []
        for i in range(0, len(level) - 1, 2):
            left, right = level[i], level[i + 1]
            for leaf in members[i]:
                paths[leaf] += bytes([_RIGHT]) + right
            for leaf in members[i + 1]:
                paths[leaf] += bytes([_LEFT]) + left
            nxt.append(_node(left, right))
            nxt_members.append(members[i] + members[i + 1])
        if len(level) % 2:  # an odd node is carried up unchanged
            nxt.append(level[-1])
            nxt_members.append(members[-1])
        level, members = nxt, nxt_members
    signature = signer.sign(_ROOT + level[0])
    head = bytes([_VERSION]) + signature
    return [head + bytes(p) for p in paths]


class SignatureCache:
    """Remembers the (producer, node) pairs of verified audit paths; a bounded LRU."""

    def __init__(self, size: int = 65536) -> None:
        self._size = size
        self._seen: OrderedDict[bytes, None] = OrderedDict()
        self.hits = 0

    def check(self, token: bytes) -> bool:
        if token in self._seen:
            self._seen.move_to_end(token)
            self.hits += 1
            return True
        return False

    def add(self, token: bytes) -> None:
        self._seen[token] = None
        if len(self._seen) > self._size:
            self._seen.popitem(last=False)


def verify_record(
    keyring: Keyring,
    producer: str,
    leaf: bytes,
    header: bytes | None,
    cache: SignatureCache | None = None,
) -> None:
    """Raise :class:`SignatureError` unless ``header`` proves ``producer`` signed ``leaf``.

    With a ``cache``, every node of a verified audit path is remembered per producer: a
    later record of the same batch stops hashing at the first node it shares with one
    already verified (usually after one or two hashes) and needs no Ed25519 check.
    """
    if not header:
        raise SignatureError("record is not signed (no strata-signature header)")
    if header[0] != _VERSION or len(header) < 1 + _SIG_LEN or (len(header) - 1 - _SIG_LEN) % _STEP:
        raise SignatureError("malformed strata-signature header")
    prefix = producer.encode() + b"\0"
    node = leaf
    path: list[bytes] = []
    for off in range(1 + _SIG_LEN, len(header), _STEP):
        if cache is not None and cache.check(prefix + node):
            break
        path.append(node)
        side, sibling = header[off], header[off + 1 : off + _STEP]
        node = _node(node, sibling) if side == _RIGHT else _node(sibling, node)
    else:
        if cache is None or not cache.check(prefix + node):
            keyring.verify(producer, _ROOT + node, header[1 : 1 + _SIG_LEN])
            path.append(node)
    if cache is not None:
        # Every node below a verified one is proven too: the batch's next record stops early.
        for n in path:
            cache.add(prefix + n)


def verify_batch(
    keyring: Keyring,
    producer: str,
    leaves: Sequence[bytes],
    headers: Sequence[bytes | None],
    cache: SignatureCache | None = None,
) -> None:
    """Raise :class:`SignatureError` unless ``leaves`` are, in order, *all* the leaves of one
    batch ``producer`` signed with :func:`sign_batch` and every given header is exactly the
    one :func:`sign_batch` produced for its leaf (``None``: that leaf's header is kept
    elsewhere; at least one is given).

    For a reader holding the whole batch: the root is rebuilt from the leaves (n - 1
    hashes) and checked with one Ed25519 verification, and each header is compared with
    its expected bytes instead of walking its audit path, so every header that passes here
    also passes :func:`verify_record`.  Anything short of the whole batch, in order (a
    batch cut by paging or pruning, a moved record), fails: fall back to
    :func:`verify_record`, which proves records one by one.  With a ``cache`` a verified
    root is remembered, so those per-record checks then stop at the root.
    """
    if not leaves or len(headers) != len(leaves):
        raise SignatureError("a batch needs its leaves and one header (or None) per leaf")
    signed = next((h for h in headers if h), None)
    if signed is None:
        raise SignatureError("record is not signed (no strata-signature header)")
    if signed[0] != _VERSION or len(signed) < 1 + _SIG_LEN:
        raise SignatureError("malformed strata-signature header")
    head = signed[: 1 + _SIG_LEN]
    sha = hashlib.sha256
    levels = [list(leaves)]
    while len(levels[-1]) > 1:
        level = levels[-1]
        nxt = [sha(_NODE + a + b).digest() for a, b in zip(level[::2], level[1::2], strict=False)]
        if len(level) % 2:  # an odd node is carried up unchanged
            nxt.append(level[-1])
        levels.append(nxt)
    root = levels[-1][0]
    # paths[j] = the audit path from node j of a level up to the root, built top-down: a
    # pair of siblings shares the path above them, so each costs one concatenation a level.
    paths = [b""]
    for level in reversed(levels[:-1]):
        below: list[bytes] = []
        add = below.append
        for left, right, above in zip(level[::2], level[1::2], paths, strict=False):
            add(_RIGHT_STEP + right + above)
            add(_LEFT_STEP + left + above)
        if len(level) % 2:
            add(paths[-1])
        paths = below
    for i, (header, path) in enumerate(zip(headers, paths, strict=True)):
        if header is not None and header != head + path:
            raise SignatureError(f"leaf {i} does not carry its batch's signature and audit path")
    token = producer.encode() + b"\0" + root
    if cache is None or not cache.check(token):
        keyring.verify(producer, _ROOT + root, head[1:])
        if cache is not None:
            cache.add(token)
