"""Service and client identities: Ed25519 key files, the client registry, and the keyring.

Layout of the keys folder (``settings.keys_dir``, default ``$STRATA_HOME/keys``)::

    guard.key        base64 raw private key of the identity `guard` (mode 0600)
    guard.pub        base64 raw public key of `guard`
    infer.r1.pub     an instance of `infer`: shares the topic permissions of `infer`
    clients.json     {"acme-web": {"tenant": "acme", "public_key": "<base64>"}}

A process signs with its own identity's private key, taken from
``STRATA_SECURITY__PRIVATE_KEY`` (base64) or ``<keys_dir>/<identity>.key``; it trusts every
``*.pub`` in the folder and every client in ``clients.json``.  External producers sign as
``client:<name>``; the tenant of their events is the one registered for their key.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

from stratamesh.config import Settings
from stratamesh.errors import ConfigError, SignatureError, UnauthorizedProducer

__all__ = [
    "CLIENTS_FILE",
    "CLIENT_PREFIX",
    "ClientKey",
    "Keyring",
    "SigningKey",
    "generate_identity",
    "load_signing_key",
    "register_client",
]

CLIENT_PREFIX = "client:"
CLIENTS_FILE = "clients.json"
_IDENTITY = re.compile(r"^[a-z][a-z0-9_-]*(\.[a-z0-9_-]+)?$")
_CLIENT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def _unb64(text: str, what: str) -> bytes:
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ConfigError(f"{what} is not valid base64") from exc
    if len(raw) != 32:
        raise ConfigError(f"{what} must be 32 raw bytes (base64), got {len(raw)}")
    return raw


@dataclass(frozen=True, slots=True)
class SigningKey:
    """The private key of one identity."""

    identity: str
    key: Ed25519PrivateKey

    def sign(self, message: bytes) -> bytes:
        return self.key.sign(message)

    @property
    def public_bytes(self) -> bytes:
        return self.key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    @classmethod
    def from_base64(cls, identity: str, text: str) -> SigningKey:
        raw = _unb64(text, f"private key of {identity!r}")
        return cls(identity, Ed25519PrivateKey.from_private_bytes(raw))


@dataclass(frozen=True, slots=True)
class ClientKey:
    name: str
    tenant: str
    public_key: Ed25519PublicKey


def _check_identity(identity: str) -> None:
    if not _IDENTITY.match(identity):
        raise ConfigError(
            f"invalid service identity {identity!r}: use `service` or `service.instance` "
            "(lower case letters, digits, '-' and '_')"
        )


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text + "\n")


def generate_identity(keys_dir: Path, identity: str, *, overwrite: bool = False) -> SigningKey:
    """Create ``<identity>.key`` and ``<identity>.pub`` in ``keys_dir``."""
    _check_identity(identity)
    keys_dir.mkdir(parents=True, exist_ok=True)
    priv_path = keys_dir / f"{identity}.key"
    if priv_path.exists() and not overwrite:
        raise ConfigError(f"{priv_path} exists; pass --overwrite to replace it")
    key = Ed25519PrivateKey.generate()
    signing = SigningKey(identity, key)
    raw = key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    _write_private(priv_path, _b64(raw))
    (keys_dir / f"{identity}.pub").write_text(_b64(signing.public_bytes) + "\n")
    return signing


def register_client(
    keys_dir: Path, name: str, tenant: str, *, overwrite: bool = False
) -> SigningKey:
    """Create a client key bound to ``tenant``; the private key goes to ``client-<name>.key``."""
    if not _CLIENT_NAME.match(name) or not tenant:
        raise ConfigError(f"invalid client name {name!r} or empty tenant")
    keys_dir.mkdir(parents=True, exist_ok=True)
    registry_path = keys_dir / CLIENTS_FILE
    registry = _read_clients_file(registry_path)
    if name in registry and not overwrite:
        raise ConfigError(f"client {name!r} is already registered; pass --overwrite to replace")
    key = Ed25519PrivateKey.generate()
    signing = SigningKey(CLIENT_PREFIX + name, key)
    raw = key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    _write_private(keys_dir / f"client-{name}.key", _b64(raw))
    registry[name] = {"tenant": tenant, "public_key": _b64(signing.public_bytes)}
    tmp = registry_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(registry, indent=2, sort_keys=True) + "\n")
    tmp.replace(registry_path)
    return signing


def _read_clients_file(path: Path) -> dict[str, dict[str, str]]:
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold an object of clients")
    return data


def load_signing_key(settings: Settings, identity: str) -> SigningKey:
    """The private key this process signs with, from the environment or the keys folder."""
    if identity.startswith(CLIENT_PREFIX):
        name = identity.removeprefix(CLIENT_PREFIX)
        path = settings.keys_dir / f"client-{name}.key"
    else:
        _check_identity(identity)
        path = settings.keys_dir / f"{identity}.key"
    if settings.security.private_key:
        return SigningKey.from_base64(identity, settings.security.private_key)
    if not path.exists():
        hint = (
            f"strata keys gen --client {identity.removeprefix(CLIENT_PREFIX)} --tenant T"
            if identity.startswith(CLIENT_PREFIX)
            else f"strata keys gen {identity}"
        )
        raise ConfigError(
            f"no private key for {identity!r} at {path}: run `{hint}` or set "
            "STRATA_SECURITY__PRIVATE_KEY"
        )
    return SigningKey.from_base64(identity, path.read_text())


class Keyring:
    """The public keys a consumer trusts: service identities and registered clients."""

    def __init__(
        self,
        services: dict[str, Ed25519PublicKey] | None = None,
        clients: dict[str, ClientKey] | None = None,
    ) -> None:
        self._services = dict(services or {})
        self._clients = dict(clients or {})

    @classmethod
    def load(cls, keys_dir: Path) -> Keyring:
        services: dict[str, Ed25519PublicKey] = {}
        if keys_dir.is_dir():
            for pub in sorted(keys_dir.glob("*.pub")):
                raw = _unb64(pub.read_text(), f"public key {pub}")
                services[pub.stem] = Ed25519PublicKey.from_public_bytes(raw)
        clients: dict[str, ClientKey] = {}
        for name, entry in _read_clients_file(keys_dir / CLIENTS_FILE).items():
            raw = _unb64(entry.get("public_key", ""), f"public key of client {name!r}")
            clients[name] = ClientKey(
                name, entry.get("tenant", ""), Ed25519PublicKey.from_public_bytes(raw)
            )
        return cls(services, clients)

    def add(self, identity: str, public_key: bytes) -> None:
        self._services[identity] = Ed25519PublicKey.from_public_bytes(public_key)

    def add_client(self, name: str, tenant: str, public_key: bytes) -> None:
        self._clients[name] = ClientKey(
            name, tenant, Ed25519PublicKey.from_public_bytes(public_key)
        )

    def client(self, identity: str) -> ClientKey | None:
        """The registered client behind ``client:<name>``, if any."""
        if not identity.startswith(CLIENT_PREFIX):
            return None
        return self._clients.get(identity.removeprefix(CLIENT_PREFIX))

    def public_key(self, identity: str) -> Ed25519PublicKey:
        if identity.startswith(CLIENT_PREFIX):
            client = self.client(identity)
            if client is None:
                raise UnauthorizedProducer(f"unknown client {identity!r}")
            return client.public_key
        key = self._services.get(identity)
        if key is None:
            raise UnauthorizedProducer(f"no public key for producer {identity!r}")
        return key

    def verify(self, identity: str, message: bytes, signature: bytes) -> None:
        try:
            self.public_key(identity).verify(signature, message)
        except InvalidSignature:
            raise SignatureError(f"signature of {identity!r} does not verify") from None

    @property
    def identities(self) -> list[str]:
        return sorted(self._services) + [CLIENT_PREFIX + c for c in sorted(self._clients)]
