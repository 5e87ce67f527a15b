"""Batched Ed25519 record signatures: every record verifies alone; any change breaks it."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from stratamesh.bus import headers as H
from stratamesh.errors import SignatureError, UnauthorizedProducer
from stratamesh.security.keys import Keyring, SigningKey
from stratamesh.security.signing import SignatureCache, leaf_hash, sign_batch, verify_record


def _ring() -> tuple[SigningKey, Keyring]:
    key = SigningKey("guard", Ed25519PrivateKey.generate())
    ring = Keyring()
    ring.add("guard", key.public_bytes)
    return key, ring


def _leaf(i: int, **headers: bytes) -> bytes:
    hdrs = {H.PRODUCER: b"guard", H.EVENT_ID: f"e{i}".encode(), **headers}
    return leaf_hash(f"k{i}".encode(), f"value {i}".encode(), hdrs)


@given(st.integers(min_value=1, max_value=70))
@settings(max_examples=25, deadline=None)
def test_every_record_of_a_batch_verifies_on_its_own(n: int) -> None:
    key, ring = _ring()
    leaves = [_leaf(i) for i in range(n)]
    for leaf, sig in zip(leaves, sign_batch(key, leaves), strict=True):
        verify_record(ring, "guard", leaf, sig)  # no cache: full Ed25519 check each time


@given(st.integers(min_value=2, max_value=40), st.data())
@settings(max_examples=25, deadline=None)
def test_a_signature_never_vouches_for_another_record(n: int, data: st.DataObject) -> None:
    key, ring = _ring()
    leaves = [_leaf(i) for i in range(n)]
    sigs = sign_batch(key, leaves)
    i = data.draw(st.integers(0, n - 1))
    j = data.draw(st.integers(0, n - 1).filter(lambda x: x != i))
    with pytest.raises(SignatureError):
        verify_record(ring, "guard", leaves[j], sigs[i])


def test_any_signed_header_change_breaks_the_signature() -> None:
    key, ring = _ring()
    hdrs = {H.PRODUCER: b"guard", H.TENANT: b"acme", H.NEXT: b"infer"}
    leaf = leaf_hash(b"k", b"v", hdrs)
    sig = sign_batch(key, [leaf])[0]
    verify_record(ring, "guard", leaf, sig)
    for name, value in [(H.TENANT, b"evil"), (H.NEXT, b"guard_out"), (H.DEADLINE, b"1")]:
        changed = leaf_hash(b"k", b"v", {**hdrs, name: value})
        with pytest.raises(SignatureError):
            verify_record(ring, "guard", changed, sig)
    with pytest.raises(SignatureError):
        verify_record(ring, "guard", leaf_hash(b"k", b"v2", hdrs), sig)
    with pytest.raises(SignatureError):
        verify_record(ring, "guard", leaf_hash(b"k2", b"v", hdrs), sig)
    # headers outside the signature (attempt, replay, DLT) do not matter
    verify_record(
        ring, "guard", leaf_hash(b"k", b"v", {**hdrs, H.ATTEMPT: b"3", H.REPLAY: b"r1"}), sig
    )


def test_absent_and_empty_header_differ() -> None:
    assert leaf_hash(b"k", b"v", {H.NEXT: b""}) != leaf_hash(b"k", b"v", {})
    assert leaf_hash(None, b"v", {}) != leaf_hash(b"", b"v", {})


def test_forged_unknown_and_malformed() -> None:
    key, ring = _ring()
    leaf = _leaf(0)
    forger = SigningKey("guard", Ed25519PrivateKey.generate())
    with pytest.raises(SignatureError):
        verify_record(ring, "guard", leaf, sign_batch(forger, [leaf])[0])
    with pytest.raises(UnauthorizedProducer):
        verify_record(ring, "route", leaf, sign_batch(key, [leaf])[0])
    for bad in [None, b"", b"\x02" + b"x" * 64, b"\x01" + b"x" * 10, b"\x01" + b"x" * 70]:
        with pytest.raises(SignatureError):
            verify_record(ring, "guard", leaf, bad)


def test_cache_skips_ed25519_for_the_rest_of_a_batch_but_not_for_forgeries() -> None:
    key, ring = _ring()
    leaves = [_leaf(i) for i in range(16)]
    sigs = sign_batch(key, leaves)
    cache = SignatureCache()
    for leaf, sig in zip(leaves, sigs, strict=True):
        verify_record(ring, "guard", leaf, sig, cache)
    assert cache.hits == 15
    # a cached root does not help a record that is not under it
    with pytest.raises(SignatureError):
        verify_record(ring, "guard", _leaf(99), sigs[0], cache)
    # nor another producer claiming the same signature
    ring.add("route", key.public_bytes)
    hits = cache.hits
    verify_record(ring, "route", leaves[0], sigs[0], cache)
    assert cache.hits == hits
