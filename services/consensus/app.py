"""The consensus service: one decision per request from its replicas' signed candidates.

    inference.completed (CandidateAnswer × N, strata-next = consensus)
        ─► requests.decided  (AnswerDecided + quorum certificate, strata-next = slip's next)
        or reviews.pending   (HumanReviewRequested, every candidate) + results (escalated)

Modules: :mod:`.policy` (mode, N, f → quorum), :mod:`.registry` (who may vote, what each
replica is, and the checks the bus cannot make), :mod:`.equivalence` (when two answers
agree), :mod:`.quorum` (the tally and the certificate), :mod:`.state` (ballots in Redis:
the crash-safety choice is explained there), :mod:`.outcomes` (the events, with ids fixed
per request), :mod:`.aggregate` (the flow).

Timing: a request's collection window opens with its first candidate and closes after
``settings.consensus.window_ms`` (or the route's ``consensus.timeout_ms``), never later
than the request's deadline less ``deadline_margin_ms``.  A vote ends as soon as a quorum
is certain or impossible; a request still open when its window closes is escalated (or
decided by the configured fallback) by a sweeper task that every instance runs over the
shared due set (one instance per request, by a lease).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence

import structlog

from stratamesh.bus.middleware import Context
from stratamesh.bus.service import Service
from stratamesh.bus.topics import INFERENCE_COMPLETED, Stage
from stratamesh.config import Settings
from stratamesh.errors import BrokerError
from stratamesh.events import CandidateAnswer

from .aggregate import Consensus, Sink
from .outcomes import Emission

__all__ = ["KafkaSink", "build_service", "engine", "service"]

log = structlog.get_logger("stratamesh.consensus")

SERVICE = "consensus"


class KafkaSink:
    """Sends the sweeper's outcomes through the service's own producer, and waits for the
    broker's acknowledgement (the due entry is removed only after it)."""

    def __init__(self, svc: Service) -> None:
        self.svc = svc

    async def send(self, emissions: Sequence[Emission]) -> None:
        pipeline, producer = self.svc.pipeline, self.svc.producer
        if pipeline is None or producer is None:
            raise BrokerError("consensus is not running")
        futures = [
            producer.send(
                pipeline.event_record(
                    e.event,
                    pipeline.topic_for(e.event),
                    next_stage=e.next_stage,
                    deadline_ms=e.deadline_ms,
                )
            )
            for e in emissions
        ]
        await asyncio.gather(*futures)


async def _sweep_forever(svc: Service, engine: Consensus, sink: Sink) -> None:
    interval = engine.cfg.sweep_interval_ms / 1000
    while True:
        await asyncio.sleep(interval)
        if svc.runtime is None or svc.pipeline is None:
            continue  # not started yet, or stopping
        try:
            await engine.sweep(sink, producer=svc.identity, namespace=svc.namespace)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # Redis or broker blip: the due set keeps the work
            log.warning("sweep failed", error=repr(exc))


def build_service(engine: Consensus) -> Service:
    svc = Service(SERVICE)
    sweepers: dict[int, asyncio.Task[None]] = {}

    @svc.on_bind
    def _bind(settings: Settings) -> None:
        engine.bind(settings)

    @svc.on_start
    async def _start(settings: Settings) -> None:
        engine.bind(settings)
        await engine.warm()
        registry = engine.registry
        if registry is not None:
            log.info("replica registry", replicas=[r.describe() for r in registry.known])
        # Started before the consumer joins; it idles until the runtime exists.
        sweepers[id(svc)] = asyncio.create_task(
            _sweep_forever(svc, engine, KafkaSink(svc)), name="consensus-sweeper"
        )

    @svc.on_stop
    async def _stop() -> None:
        task = sweepers.pop(id(svc), None)
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await engine.close()

    @svc.subscribe(INFERENCE_COMPLETED, stage=Stage.CONSENSUS)
    async def on_candidate(event: CandidateAnswer, ctx: Context) -> None:
        await engine.on_candidate(event, ctx)

    return svc


engine = Consensus()
service = build_service(engine)
