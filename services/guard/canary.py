"""Canary tokens: a per-request secret marker the model must never repeat.

``canary(request_id) = "cn-" + HMAC-SHA256(canary key, request_id)[:16 hex]``: unguessable
without the guard secret, the same on every replica and redelivery (no state to store), and
recomputable by the output stage, which therefore does not have to trust the copy that
travels in ``Query.canary``.  infer places it right after the shared template prefix; an
answer that contains it (in any case, with or without separators) shows the model was made to
disclose its instructions.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
from pathlib import Path

from stratamesh.config import Settings
from stratamesh.security.pseudonym import derive_key

__all__ = ["CanaryMinter", "load_guard_secret"]

_SECRET_FILE = "guard.secret"


def load_guard_secret(settings: Settings) -> bytes:
    """``STRATA_GUARD__SECRET``, else ``HOME/keys/guard.secret`` (created once, mode 0600)."""
    if settings.guard.secret is not None:
        return settings.guard.secret.get_secret_value().encode("utf-8")
    path = Path(settings.keys_dir) / _SECRET_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_text("ascii").strip().encode("ascii")
    value = secrets.token_hex(32)
    with os.fdopen(fd, "w") as fh:
        fh.write(value + "\n")
    return value.encode("ascii")


_SEPARATORS = re.compile(r"[\s\-_.·`'\"*]")


class CanaryMinter:
    def __init__(self, secret: bytes) -> None:
        self._key = derive_key(secret, "canary")

    def __repr__(self) -> str:
        return "CanaryMinter()"

    def mint(self, request_id: str) -> str:
        digest = hmac.new(self._key, request_id.encode("utf-8"), hashlib.sha256).hexdigest()
        return f"cn-{digest[:16]}"

    @staticmethod
    def leaked(canary: str, text: str) -> bool:
        """True when ``text`` contains ``canary``'s secret part, even re-spaced or re-cased."""
        core = canary.removeprefix("cn-").lower()
        if not core:
            return False
        return core in text.lower() or core in _SEPARATORS.sub("", text.lower())
