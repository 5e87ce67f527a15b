"""What both guard stages share: settings, policy, scanners, pseudonymiser, canary minter.

Built from settings when the service's pipeline is bound (:meth:`Guard.bind`); the mapping
store (the operational Redis) is opened then and closed when the service stops.  Tests inject
a store of their own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

from stratamesh.config import GuardSettings, Settings
from stratamesh.errors import ConfigError
from stratamesh.models.injection import load_injection_model
from stratamesh.security.pseudonym import (
    MappingStore,
    Pseudonymiser,
    RedisMappingStore,
    derive_key,
)
from stratamesh.stores.redis import open_redis

from .canary import CanaryMinter, load_guard_secret
from .injection import InjectionScanner
from .ledger import MemoryReviewLedger, RedisReviewLedger, ReviewLedger
from .policy import GuardPolicy

__all__ = ["GUARD_VERSION", "Guard", "Ready"]

GUARD_VERSION: Final = "1.0.0"
"""The scanner set and its rules; thresholds travel in each finding."""


@dataclass(slots=True)
class Ready:
    settings: GuardSettings
    policy: GuardPolicy
    injection: InjectionScanner
    injection_threshold: float
    pseudonymiser: Pseudonymiser
    canary: CanaryMinter
    reviews: ReviewLedger

    @property
    def version(self) -> str:
        """``guard@1.0.0+injection-hashlr-v1``: what every verdict and result records."""
        return f"guard@{GUARD_VERSION}+{self.injection.version}"

    def versions(self) -> dict[str, str]:
        return {"guard": GUARD_VERSION, "guard_injection_model": self.injection.version}


@dataclass(slots=True)
class Guard:
    store: MappingStore | None = None  # injected (tests) or opened in bind()
    ready: Ready | None = None
    _owned: RedisMappingStore | None = field(default=None, repr=False)

    def bind(self, settings: Settings) -> Ready:
        cfg = settings.guard
        model = load_injection_model(str(cfg.injection_model) if cfg.injection_model else None)
        store = self.store
        reviews: ReviewLedger
        if store is None:
            if self._owned is None:
                self._owned = RedisMappingStore(open_redis(settings))
            store = self._owned
            reviews = RedisReviewLedger(self._owned.redis)
        else:
            reviews = MemoryReviewLedger()
        secret = load_guard_secret(settings)
        self.ready = Ready(
            settings=cfg,
            policy=GuardPolicy.load(cfg),
            injection=InjectionScanner(model),
            injection_threshold=(
                cfg.injection_threshold if cfg.injection_threshold is not None else model.threshold
            ),
            pseudonymiser=Pseudonymiser(
                derive_key(secret, "pseudonym"), store, ttl_s=cfg.pseudonym_ttl_s
            ),
            canary=CanaryMinter(secret),
            reviews=reviews,
        )
        return self.ready

    def get(self) -> Ready:
        if self.ready is None:
            raise ConfigError("the guard service is not bound: build its pipeline first")
        return self.ready

    async def close(self) -> None:
        if self._owned is not None:
            await self._owned.aclose()
            self._owned = None
