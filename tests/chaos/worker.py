"""A `route`-like worker for the crash test: requests.admitted → requests.routed.

Run as ``python -m tests.chaos.worker`` with STRATA_* settings in the environment.
"""

from __future__ import annotations

import asyncio
import os
import signal

from stratamesh.bus import topics as T
from stratamesh.bus.middleware import Context
from stratamesh.bus.service import Service
from stratamesh.config import Settings
from stratamesh.events import RequestAdmitted, RequestRouted
from stratamesh.events.testing import sample_event

DELAY_S = float(os.environ.get("WORKER_DELAY_S", "0.002"))

service = Service("route")


@service.subscribe(T.REQUESTS_ADMITTED)
async def route(event: RequestAdmitted, ctx: Context) -> None:
    await asyncio.sleep(DELAY_S)  # stands in for real work, so the kill lands mid-stream
    ctx.publish(
        sample_event(
            RequestRouted, event_id=ctx.derive_id(), request_id=event.request_id, tenant=ctx.tenant
        )
    )


async def main() -> None:
    settings = Settings()
    await service.start(settings)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    print("ready", flush=True)
    await asyncio.wait(
        [asyncio.create_task(stop.wait()), asyncio.create_task(service.wait())],
        return_when=asyncio.FIRST_COMPLETED,
    )
    await service.stop()


if __name__ == "__main__":
    asyncio.run(main())
