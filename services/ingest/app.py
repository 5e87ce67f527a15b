"""The ingest service: ``docs.submitted`` → ``docs.chunked`` | ``docs.rejected``.

Every submission gets exactly one outcome event (id ``ctx.derive_id(0)``, so a client can
compute it as ``derived_event_id(submission_id, "ingest", 0)``): ``DocumentChunked`` for a
new version, ``DocumentRejected`` otherwise (code ``unchanged`` for an identical
re-submission).  The tokenizer and the version store are opened from the settings the
pipeline is built with (``Service.start`` and ``MemoryMesh`` both build it).
"""

from __future__ import annotations

from typing import Final

from stratamesh.bus import Context, topics
from stratamesh.bus.codec import Codec
from stratamesh.bus.middleware import Pipeline
from stratamesh.bus.service import Service
from stratamesh.config import Settings
from stratamesh.errors import ConfigError
from stratamesh.events import DocumentSubmitted
from stratamesh.security.keys import Keyring
from stratamesh.services.ingest.ingestor import Ingestor
from stratamesh.services.ingest.validate import Policy
from stratamesh.stores.idempotency import IdempotencyStore

__all__ = ["BATCH_SIZE", "BATCH_WAIT_MS", "IngestService", "service"]

# Submissions handled together (one state round trip, one thread hop for the CPU work).
BATCH_SIZE: Final = 64
BATCH_WAIT_MS: Final = 10


class IngestService(Service):
    """A :class:`Service` that opens its tokenizer and version store with its pipeline."""

    def __init__(
        self,
        *,
        identity: str | None = None,
        group: str | None = None,
        shadow: bool = False,
        policy: Policy | None = None,
    ) -> None:
        super().__init__("ingest", identity=identity, group=group, shadow=shadow)
        self.policy = policy
        self.ingestor: Ingestor | None = None
        self.subscribe(topics.DOCS_SUBMITTED, batch_size=BATCH_SIZE, batch_wait_ms=BATCH_WAIT_MS)(
            self.on_submitted
        )

    async def on_submitted(self, items: list[tuple[DocumentSubmitted, Context]]) -> None:
        if self.ingestor is None:
            raise ConfigError("the ingest pipeline was not built (Service.start / MemoryMesh)")
        await self.ingestor.handle(items)

    def build_pipeline(
        self,
        settings: Settings,
        *,
        keyring: Keyring | None = None,
        idempotency: IdempotencyStore | None = None,
        codec: Codec | None = None,
    ) -> Pipeline:
        pipeline = super().build_pipeline(
            settings, keyring=keyring, idempotency=idempotency, codec=codec
        )
        self.ingestor = Ingestor.from_settings(settings, scope=self.group, policy=self.policy)
        return pipeline

    def variant(
        self, *, identity: str | None = None, group: str | None = None, shadow: bool = False
    ) -> IngestService:
        return IngestService(
            identity=identity or self.identity, group=group, shadow=shadow, policy=self.policy
        )

    async def stop(self) -> None:
        await super().stop()
        if self.ingestor is not None:
            await self.ingestor.close()
            self.ingestor = None


service = IngestService()
