"""Every log line of a handled record carries its identifiers; metrics count what happened."""

from __future__ import annotations

import io
import json
from contextlib import redirect_stderr
from typing import Any

import structlog

from stratamesh.bus import topics as T
from stratamesh.bus.middleware import Context
from stratamesh.bus.service import Service
from stratamesh.errors import Transient
from stratamesh.events import InferenceRequested
from stratamesh.events.testing import sample_event
from stratamesh.obs.logging import configure_logging
from stratamesh.obs.metrics import REGISTRY
from tests.integration.conftest import Env
from tests.integration.test_bus import eventually


def _value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_log_context_and_metrics(env: Env) -> None:
    client = env.client("web", "acme")
    pub = await env.publisher(client)
    settings = env.settings.model_copy(
        update={
            "retry": env.settings.retry.model_copy(update={"attempts": 2, "base_delay_s": 0.01})
        }
    )
    seen: list[Any] = []
    secret = "my card is 4111 1111 1111 1111"

    async def handler(event: InferenceRequested, ctx: Context) -> None:
        if len(seen) == 0:
            seen.append("failed once")
            raise Transient("upstream 503")
        structlog.get_logger("guard").info("admitted")
        seen.append(event.event_id)

    svc = Service("guard", group="guard-obs")
    svc.subscribe(T.REQUESTS_SUBMITTED)(handler)
    labels = {"service": "guard", "topic": T.REQUESTS_SUBMITTED}
    consumed0 = _value("strata_messages_consumed_total", **labels)
    retries0 = _value("strata_retries_total", **labels)
    dlq0 = _value("strata_dlq_messages_total", failure_class="poison", **labels)

    buf = io.StringIO()
    with redirect_stderr(buf):
        configure_logging("INFO", json=True)
        try:
            await env.start(svc, settings)
            event = sample_event(InferenceRequested, request_id="req-obs", prompt=secret)
            await pub.publish(event)
            poison = pub.record(sample_event(InferenceRequested, request_id="req-obs"))
            poison.value = b"garbage"
            await pub.producer.send(poison)
            await eventually(lambda: event.event_id in seen)
            await eventually(
                lambda: _value("strata_dlq_messages_total", failure_class="poison", **labels) > dlq0
            )
        finally:
            structlog.reset_defaults()

    lines = [json.loads(x) for x in buf.getvalue().splitlines() if x.startswith("{")]
    admitted = [x for x in lines if x.get("event") == "admitted"]
    assert len(admitted) == 1
    line = admitted[0]
    assert line["service"] == "guard" and line["tenant"] == "acme"
    assert line["request_id"] == "req-obs" and line["event_id"] == event.event_id
    assert len(line["trace_id"]) == 32
    retry = [x for x in lines if x.get("event") == "handler failed, retrying"]
    assert retry and retry[0]["request_id"] == "req-obs"
    assert secret not in buf.getvalue()  # the middleware logs ids, never payloads

    assert _value("strata_messages_consumed_total", **labels) >= consumed0 + 2
    assert _value("strata_retries_total", **labels) == retries0 + 1
    assert _value("strata_handler_seconds_count", **labels) > 0
