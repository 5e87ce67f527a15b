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
import re

from stratamesh.security.pseudonym import derive_key, load_guard_secret

__all__ = ["CanaryMinter", "load_guard_secret"]

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
