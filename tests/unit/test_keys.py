from __future__ import annotations

import stat
from pathlib import Path

import pytest

from stratamesh.config import Settings
from stratamesh.errors import ConfigError, UnauthorizedProducer
from stratamesh.security.keys import (
    Keyring,
    generate_identity,
    load_signing_key,
    register_client,
)


def test_generate_load_and_trust(tmp_path: Path) -> None:
    generate_identity(tmp_path, "guard")
    generate_identity(tmp_path, "infer.r1")
    register_client(tmp_path, "acme-web", "acme")
    assert stat.S_IMODE((tmp_path / "guard.key").stat().st_mode) == 0o600
    settings = Settings(home=tmp_path / "h", security={"keys_dir": tmp_path})  # type: ignore[arg-type]
    key = load_signing_key(settings, "guard")
    ring = Keyring.load(tmp_path)
    assert ring.identities == ["guard", "infer.r1", "client:acme-web"]
    ring.verify("guard", b"m", key.sign(b"m"))
    client = ring.client("client:acme-web")
    assert client is not None and client.tenant == "acme"
    ckey = load_signing_key(settings, "client:acme-web")
    ring.verify("client:acme-web", b"m", ckey.sign(b"m"))


def test_errors_say_how_to_fix(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path)
    with pytest.raises(ConfigError, match="strata keys gen guard"):
        load_signing_key(settings, "guard")
    with pytest.raises(ConfigError, match="invalid service identity"):
        generate_identity(tmp_path, "Bad Name")
    generate_identity(tmp_path, "guard")
    with pytest.raises(ConfigError, match="--overwrite"):
        generate_identity(tmp_path, "guard")
    with pytest.raises(UnauthorizedProducer):
        Keyring.load(tmp_path).public_key("client:nobody")


def test_private_key_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key = generate_identity(tmp_path / "k", "route")
    text = (tmp_path / "k" / "route.key").read_text().strip()
    monkeypatch.setenv("STRATA_SECURITY__PRIVATE_KEY", text)
    loaded = load_signing_key(Settings(home=tmp_path / "elsewhere"), "route")
    assert loaded.public_bytes == key.public_bytes
    monkeypatch.setenv("STRATA_SECURITY__PRIVATE_KEY", "not base64!")
    with pytest.raises(ConfigError, match="base64"):
        load_signing_key(Settings(home=tmp_path), "route")
