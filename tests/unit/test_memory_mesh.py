"""The in-memory harness runs the same middleware as the broker runtime."""

from __future__ import annotations

from typing import Any

from stratamesh.bus import headers as H
from stratamesh.bus import topics as T
from stratamesh.bus.middleware import Context, DeadLettered, Handled, Skipped
from stratamesh.bus.service import Service
from stratamesh.bus.testing import MemoryMesh
from stratamesh.errors import DeadlineExceeded, Transient
from stratamesh.events import (
    CompletionStatus,
    InferenceRequested,
    RequestAdmitted,
    RequestCompleted,
)
from stratamesh.events.testing import sample_event


def _guard(seen: list[Any], fail_times: int = 0) -> Service:
    svc = Service("guard")
    failures = {"left": fail_times}

    @svc.subscribe(T.REQUESTS_SUBMITTED, stage=T.Stage.GUARD_IN)
    async def admit(event: InferenceRequested, ctx: Context) -> None:
        if failures["left"]:
            failures["left"] -= 1
            raise Transient("flaky")
        seen.append((event, ctx.tenant, ctx.attempt))
        ctx.publish(
            sample_event(
                RequestAdmitted,
                event_id=ctx.derive_id(),
                request_id=event.request_id,
                tenant=ctx.tenant,
            ),
            next_stage=T.Stage.ROUTE,
        )

    return svc


async def test_handler_outputs_carry_derived_ids_trace_and_next_stage() -> None:
    seen: list[Any] = []
    mesh = MemoryMesh(_guard(seen))
    client = mesh.client("web", tenant="acme")
    ingress = await mesh.publish(sample_event(InferenceRequested, tenant="spoofed"), as_=client)
    await mesh.run_until_idle()
    assert [(e.tenant, t) for e, t, _ in seen] == [("acme", "acme")]
    [out] = mesh.topics[T.REQUESTS_ADMITTED]
    hdrs = H.header_dict(out.headers)
    assert hdrs[H.NEXT] == b"route" and hdrs[H.PRODUCER] == b"guard"
    assert hdrs[H.TENANT] == b"acme"
    trace_in = H.header_dict(ingress.headers)[H.TRACEPARENT].split(b"-")[1]
    assert hdrs[H.TRACEPARENT].split(b"-")[1] == trace_in  # same trace, new span
    [admitted] = mesh.events(T.REQUESTS_ADMITTED)
    assert admitted.producer == "guard"


async def test_retries_then_succeeds_and_exhaustion_dead_letters() -> None:
    seen: list[Any] = []
    mesh = MemoryMesh(_guard(seen, fail_times=2))
    client = mesh.client("web", tenant="acme")
    await mesh.publish(sample_event(InferenceRequested), as_=client)
    await mesh.run_until_idle()
    assert [a for *_, a in seen] == [3]

    seen2: list[Any] = []
    mesh2 = MemoryMesh(_guard(seen2, fail_times=5))
    client2 = mesh2.client("web", tenant="acme")
    await mesh2.publish(sample_event(InferenceRequested), as_=client2)
    await mesh2.run_until_idle()
    assert seen2 == []
    [(_, _, outcome)] = mesh2.outcomes
    assert isinstance(outcome, DeadLettered) and outcome.failure == "exhausted"
    assert len(mesh2.topics[T.dlq_of(T.REQUESTS_SUBMITTED)]) == 1


async def test_duplicates_and_other_stages_are_skipped() -> None:
    seen: list[Any] = []
    mesh = MemoryMesh(_guard(seen))
    client = mesh.client("web", tenant="acme")
    event = sample_event(InferenceRequested)
    await mesh.publish(event, as_=client)
    await mesh.publish(event, as_=client)
    await mesh.publish(sample_event(InferenceRequested), as_=client, next_stage="judge")
    await mesh.run_until_idle()
    outcomes = [o for *_, o in mesh.outcomes]
    assert isinstance(outcomes[0], Handled)
    assert outcomes[1] == Skipped("duplicate") and outcomes[2] == Skipped("not-this-stage")
    assert len(seen) == 1


async def test_batched_handler_gets_a_batch_and_isolates_a_poison_record() -> None:
    calls: list[int] = []
    svc = Service("guard")

    @svc.subscribe(T.REQUESTS_SUBMITTED, batch_size=8)
    async def admit(items: list[tuple[InferenceRequested, Context]]) -> None:
        calls.append(len(items))
        for event, ctx in items:
            if event.prompt == "poison":
                raise ValueError("cannot handle this one")
            ctx.publish(
                sample_event(
                    RequestAdmitted,
                    event_id=ctx.derive_id(),
                    request_id=event.request_id,
                    tenant=ctx.tenant,
                )
            )

    mesh = MemoryMesh(svc)
    client = mesh.client("web", tenant="acme")
    for i in range(5):
        await mesh.publish(
            sample_event(
                InferenceRequested, request_id=f"r{i}", prompt="poison" if i == 2 else "fine"
            ),
            as_=client,
        )
    await mesh.run_until_idle()
    # one call with all five, then one call per record after it failed
    assert calls == [5, 1, 1, 1, 1, 1]
    kinds = [type(o).__name__ for *_, o in mesh.outcomes]
    assert kinds == ["Handled", "Handled", "DeadLettered", "Handled", "Handled"]
    assert len(mesh.topics[T.REQUESTS_ADMITTED]) == 4


async def test_a_handler_out_of_deadline_ends_the_request_with_an_expired_result() -> None:
    svc = Service("infer")

    @svc.subscribe(T.REQUESTS_SUBMITTED)
    async def slow(event: InferenceRequested, ctx: Context) -> None:
        raise DeadlineExceeded("the model call outlived the request's deadline")

    mesh = MemoryMesh(svc)
    client = mesh.client("web", tenant="acme")
    request = sample_event(InferenceRequested)
    await mesh.publish(request, as_=client)
    await mesh.run_until_idle()
    [(_, _, outcome)] = mesh.outcomes
    assert isinstance(outcome, Handled)
    [result] = mesh.events(T.RESULTS)
    assert isinstance(result, RequestCompleted) and result.status == CompletionStatus.EXPIRED
    assert result.request_id == request.request_id and result.producer == "infer"
    assert "outlived" in (result.reason or "")
    assert mesh.topics[T.dlq_of(T.REQUESTS_SUBMITTED)] == []


async def test_an_expired_request_seen_by_several_replicas_gets_one_result() -> None:
    svc = Service("infer")

    @svc.subscribe(T.REQUESTS_SUBMITTED)
    async def slow(event: InferenceRequested, ctx: Context) -> None:
        raise DeadlineExceeded("the model call outlived the request's deadline")

    mesh = MemoryMesh(svc, svc.replica(2), svc.replica(3))
    client = mesh.client("web", tenant="acme")
    await mesh.publish(sample_event(InferenceRequested), as_=client)
    await mesh.run_until_idle()
    assert len(mesh.outcomes) == 3  # every replica handled it ...
    [result] = mesh.events(T.RESULTS)  # ... replica 1 answered it
    assert isinstance(result, RequestCompleted) and result.producer == "infer"
