"""The `strata` command line."""

import asyncio
import contextlib
import dataclasses
import json
import sys
from collections.abc import Coroutine
from datetime import datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from stratamesh.config import Settings
from stratamesh.errors import StrataError

app = typer.Typer(
    help="stratamesh: an event-driven AI inference mesh over Kafka topics.\n\n"
    "Settings come from STRATA_* environment variables (see README).  Without "
    "STRATA_BOOTSTRAP_SERVERS, commands use the broker of a running `strata up`.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
topics_app = typer.Typer(help="List, create and describe the mesh's topics.", no_args_is_help=True)
keys_app = typer.Typer(help="Ed25519 identities of services and clients.", no_args_is_help=True)
dlq_app = typer.Typer(help="Inspect and redrive dead-letter topics.", no_args_is_help=True)
replay_app = typer.Typer(
    help="Reset consumer groups; copy topic ranges into the shadow namespace.", no_args_is_help=True
)
app.add_typer(topics_app, name="topics")
app.add_typer(keys_app, name="keys")
app.add_typer(dlq_app, name="dlq")
app.add_typer(replay_app, name="replay")
review_app = typer.Typer(
    help="Human review of escalated requests: list, inspect, decide.", no_args_is_help=True
)
app.add_typer(review_app, name="review")
audit_app = typer.Typer(
    help="The tamper-evident audit trail: verify it, trace a request, prune, erase a person.\n\n"
    "The trail lives in STRATA_DATABASE_URL (Postgres) or, unset, in SQLite under "
    "$STRATA_HOME/state; tables are migrated on first use.",
    no_args_is_help=True,
)
app.add_typer(audit_app, name="audit")

# Wide enough for the topic tables when piped (rich would assume 80 columns).
out = Console(width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True)
T = TypeVar("T")


def _run(coro: Coroutine[Any, Any, T]) -> T:
    try:
        return asyncio.run(coro)
    except StrataError as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None


def _settings(bootstrap: str | None = None, *, need_broker: bool = True) -> Settings:
    from stratamesh.embedded.up import bootstrap_file

    settings = Settings()
    if bootstrap:
        return settings.model_copy(update={"bootstrap_servers": bootstrap})
    if settings.bootstrap_servers or not need_broker:
        return settings
    path = bootstrap_file(settings)
    if path.exists():
        return settings.model_copy(update={"bootstrap_servers": path.read_text().strip()})
    err.print(
        "[red]error:[/red] no broker: start one with `strata up` (in another terminal), "
        "or set STRATA_BOOTSTRAP_SERVERS=HOST:PORT, or pass --bootstrap"
    )
    raise typer.Exit(2)


Bootstrap = Annotated[
    str | None,
    typer.Option(
        "--bootstrap",
        "-b",
        help="HOST:PORT of a "
        "Kafka broker (default: STRATA_BOOTSTRAP_SERVERS,"
        " then the broker of `strata up`)",
    ),
]


# -- up / run ----------------------------------------------------------------------------


@app.command()
def up(
    bootstrap: Bootstrap = None,
    service: Annotated[
        list[str] | None,
        typer.Option("--service", "-s", help="run only these services (repeatable)"),
    ] = None,
    metrics_port: Annotated[int | None, typer.Option(help="serve /metrics here")] = None,
    vllm: Annotated[
        bool,
        typer.Option(
            "--vllm", help="also start a local vLLM server on the bundled model; infer uses it"
        ),
    ] = False,
) -> None:
    """Run the whole mesh in one process: the broker, the topics and every installed service.

    Without --bootstrap (or STRATA_BOOTSTRAP_SERVERS) an embedded Tansu broker is started on
    a free loopback port (memory storage: data is gone when it stops).  Missing service keys
    and a development client `client:local` (tenant `local`) are created under
    $STRATA_HOME/keys.  infer serves the local SmolLM2 (or STRATA_INFER__ENDPOINT), in
    STRATA_INFER__REPLICAS replicas; with --vllm a local vLLM server on the same weights.
    Ctrl-C stops everything cleanly.
    """
    from stratamesh.embedded.registry import discover_services
    from stratamesh.embedded.up import DEV_CLIENT, DEV_TENANT, Mesh, start_metrics
    from stratamesh.obs.logging import configure_logging

    settings = Settings()
    if metrics_port is not None:
        settings = settings.model_copy(update={"metrics_port": metrics_port})
    configure_logging(settings.log_level, json=not sys.stderr.isatty())

    async def main() -> None:
        mesh = await Mesh.start(settings, bootstrap=bootstrap, only=service, vllm=vllm)
        port = start_metrics(mesh.settings)
        names = [s.identity for s in mesh.services] or ["none installed yet"]
        out.print(
            f"[green]stratamesh is up[/green]  broker [bold]"
            f"{mesh.settings.bootstrap_servers}[/bold]"
            f"{' (embedded)' if mesh.broker else ''}"
        )
        out.print(
            f"  services: {', '.join(names)}   "
            f"(installed: {', '.join(discover_services()) or 'none'})"
        )
        if port:
            out.print(f"  metrics:  http://127.0.0.1:{port}/metrics")
        if mesh.vllm is not None:
            out.print(f"  vLLM:     {mesh.vllm.base_url} ({mesh.vllm.served_model})")
        out.print(
            f"  as client:{DEV_CLIENT} (tenant {DEV_TENANT}):  strata ingest examples/handbook"
            '  ;  strata ask "How do I redrive dead letters?"'
        )
        out.print("  Ctrl-C to stop.")
        await mesh.run_until_signalled()
        out.print("stopped.")

    _run(main())


@app.command()
def run(
    name: Annotated[str, typer.Argument(help="the service to run, e.g. guard")],
    identity: Annotated[
        str | None, typer.Option(help="signing identity, e.g. infer.r1 (default: the service name)")
    ] = None,
    shadow: Annotated[bool, typer.Option(help="consume and produce shadow.<topic>")] = False,
    bootstrap: Bootstrap = None,
    metrics_port: Annotated[
        int | None, typer.Option(help="serve /metrics here (or STRATA_METRICS_PORT)")
    ] = None,
) -> None:
    """Run one service until Ctrl-C (its key must exist: `strata keys gen NAME`)."""
    from stratamesh.embedded.registry import load_service
    from stratamesh.obs.logging import configure_logging

    settings = _settings(bootstrap)
    if metrics_port is not None:
        settings = settings.model_copy(update={"metrics_port": metrics_port})
    configure_logging(settings.log_level, json=settings.log_json, service=name)
    svc = load_service(name)
    if identity or shadow:  # the same handlers and lifecycle hooks, another identity
        svc = svc.variant(identity=identity, shadow=shadow)

    async def main() -> None:
        import signal

        from stratamesh.embedded.up import start_metrics

        await svc.start(settings)
        start_metrics(settings)
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        waiter = asyncio.create_task(svc.wait())
        await asyncio.wait(
            [waiter, asyncio.create_task(stop.wait())], return_when=asyncio.FIRST_COMPLETED
        )
        await svc.stop()

    _run(main())


@app.command()
def ingest(
    paths: Annotated[
        list[Path],
        typer.Argument(help="files (.txt .md .html), folders, or BEIR corpus JSONL files"),
    ],
    as_: Annotated[
        str, typer.Option("--as", help="client identity that signs the documents")
    ] = "client:local",
    no_wait: Annotated[
        bool,
        typer.Option("--no-wait", help="publish and return without waiting for ingest's verdicts"),
    ] = False,
    bootstrap: Bootstrap = None,
) -> None:
    """Submit documents to the knowledge plane and summarise accepted / rejected / unchanged.

    Waits until ingest has answered for every document and index has made every accepted
    version searchable (a question asked next sees them), or until nothing happened for a
    minute; --no-wait returns once the broker has the documents."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from stratamesh.docs_client import ingest_paths

    settings = _settings(bootstrap)
    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
    ) as bar:
        task = bar.add_task("documents", total=None)

        def progress(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        summary = _run(
            ingest_paths(settings, paths, identity=as_, progress=progress, wait=not no_wait)
        )
    out.print(summary.describe(), markup=False, highlight=False)


@app.command()
def ask(
    question: Annotated[str, typer.Argument(help="the question (quote it)")],
    as_: Annotated[str, typer.Option("--as", help="client identity that signs it")] = (
        "client:local"
    ),
    task: Annotated[str, typer.Option(help="task: qa, summarise, extract ...")] = "qa",
    priority: Annotated[str, typer.Option(help="lane: enterprise, pro or free")] = "pro",
    deadline: Annotated[float, typer.Option(help="seconds the mesh has to answer")] = 120.0,
    json_schema: Annotated[
        Path | None, typer.Option("--json-schema", help="answer as JSON following this schema")
    ] = None,
    max_tokens: Annotated[
        int | None,
        typer.Option(min=1, help="cap on the answer's length (default: infer's, 256)"),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the whole result event")] = False,
    bootstrap: Bootstrap = None,
) -> None:
    """Ask the mesh a question and print the answer with its citations, the slip it
    travelled, per-stage latency and cost.  Exit code 0 when answered, 1 otherwise."""
    from stratamesh.client import MeshClient
    from stratamesh.events import Priority

    settings = _settings(bootstrap)
    try:
        lane = Priority(priority)
    except ValueError:
        err.print(f"[red]error:[/red] --priority must be one of {[p.value for p in Priority]}")
        raise typer.Exit(2) from None
    schema = json_schema.read_text() if json_schema is not None else None

    async def main() -> Any:
        async with MeshClient(settings, as_) as client:
            with err.status("waiting for the answer…"):
                return await client.ask(
                    question,
                    task=task,
                    priority=lane,
                    deadline_s=deadline,
                    response_format=schema,
                    max_tokens=max_tokens,
                )

    result = _run(main())
    if as_json:
        out.print_json(result.model_dump_json())
    else:
        out.print(describe_result(result), markup=False, highlight=False)
    raise typer.Exit(0 if result.status == "ok" else 1)


def describe_result(result: Any) -> str:
    """A human rendering of a RequestCompleted event."""
    lines = [f"status: {result.status}" + (f" ({result.reason})" if result.reason else "")]
    if result.answer:
        lines += ["", result.answer.strip(), ""]
    for i, c in enumerate(result.citations, start=1):
        lines.append(f"  [{i}] {c.doc_id} v{c.doc_version} ({c.chunk_id}) score {c.score:.3f}")
    if result.slip is not None:
        lines.append("slip: " + " → ".join(s.stage for s in result.slip.stages))
    if result.stage_latency_ms:
        stages = ", ".join(f"{k} {v:.0f} ms" for k, v in result.stage_latency_ms.items())
        lines.append(f"latency: {stages}")
    cost = result.cost
    lines.append(
        f"model: {result.model or '-'}   tokens: {cost.input_tokens} in / {cost.output_tokens} "
        f"out   cost: ${cost.cost_usd:.6f}" + ("   (cached)" if result.cached else "")
    )
    if result.retry_after_ms:
        lines.append(f"retry after {result.retry_after_ms / 1000:.1f} s")
    return "\n".join(lines)


@app.command()
def reindex(
    embed_model: Annotated[
        str | None,
        typer.Option(
            help="the new embedding model (a local "
            "sentence-transformers path/name, or a "
            "model at STRATA_EMBED__ENDPOINT)"
        ),
    ] = None,
    rollback: Annotated[
        bool, typer.Option(help="point the live alias back at the previous collection")
    ] = False,
    bootstrap: Bootstrap = None,
) -> None:
    """Re-index by replay: embed docs.chunked again with another model into a new collection,
    then swap the live alias once caught up (`--rollback` swaps back)."""
    from stratamesh.reindex import reindex as run_reindex

    if not rollback and not embed_model:
        err.print("[red]error:[/red] give --embed-model NAME, or --rollback")
        raise typer.Exit(2)
    settings = _settings(bootstrap)

    def progress(**state: object) -> None:
        err.print("  " + "  ".join(f"{k}={v}" for k, v in state.items()))

    result = _run(run_reindex(settings, embed_model or "", progress=progress, rollback=rollback))
    out.print(str(result))


@app.command()
def docs(
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="write here instead of standard output")
    ] = None,
) -> None:
    """The AsyncAPI 3.0 document of every topic, event (Avro), producer and consumer."""
    from stratamesh.bus.asyncapi import asyncapi_document

    text = json.dumps(asyncapi_document(Settings().bootstrap_servers), indent=2)
    if output is None:
        print(text)
    else:
        output.write_text(text + "\n")
        out.print(f"wrote {output}")


# -- keys ----------------------------------------------------------------------------------


@keys_app.command("gen")
def keys_gen(
    identity: Annotated[
        list[str] | None, typer.Argument(help="service identities, e.g. guard infer.r1")
    ] = None,
    client: Annotated[str | None, typer.Option(help="create a client key with this name")] = None,
    tenant: Annotated[str | None, typer.Option(help="tenant bound to the client key")] = None,
    overwrite: Annotated[bool, typer.Option(help="replace existing keys")] = False,
    keys_dir: Annotated[Path | None, typer.Option(help="default: $STRATA_HOME/keys")] = None,
) -> None:
    """Generate Ed25519 keys: `strata keys gen guard route` or `--client NAME --tenant T`.

    Private keys are written with mode 0600; the public halves (*.pub, clients.json) are what
    consumers trust — copy them to every host (or mount them as a secret).
    """
    from stratamesh.security.keys import generate_identity, register_client

    folder = keys_dir or Settings().keys_dir
    if not identity and not client:
        err.print("[red]error:[/red] name at least one identity, or --client NAME --tenant T")
        raise typer.Exit(2)
    try:
        for name in identity or []:
            generate_identity(folder, name, overwrite=overwrite)
            out.print(f"{name}: {folder / (name + '.key')} (+ .pub)")
        if client:
            if not tenant:
                err.print("[red]error:[/red] a client key needs --tenant")
                raise typer.Exit(2)
            register_client(folder, client, tenant, overwrite=overwrite)
            out.print(f"client:{client} (tenant {tenant}): {folder / f'client-{client}.key'}")
    except StrataError as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None


@keys_app.command("list")
def keys_list(keys_dir: Annotated[Path | None, typer.Option()] = None) -> None:
    """List the identities whose public keys are trusted here."""
    from stratamesh.security.keys import Keyring

    folder = keys_dir or Settings().keys_dir
    ring = Keyring.load(folder)
    for identity in ring.identities:
        client = ring.client(identity)
        out.print(identity + (f"  (tenant {client.tenant})" if client else ""))


# -- publish / tail ------------------------------------------------------------------------


@app.command()
def publish(
    topic_name: Annotated[str, typer.Argument(metavar="TOPIC")],
    file: Annotated[
        Path,
        typer.Option("--file", "-f", help="JSON event (or JSON lines); '-' reads standard input"),
    ],
    as_: Annotated[str, typer.Option("--as", help="signing identity, e.g. client:local")],
    next_stage: Annotated[str | None, typer.Option("--next", help="strata-next header")] = None,
    unsigned: Annotated[
        bool,
        typer.Option(
            help="send without a signature (only accepted when unsigned ingress is enabled)"
        ),
    ] = False,
    bootstrap: Bootstrap = None,
) -> None:
    """Publish events: JSON (or JSON lines) matching the topic's event type.

    event_id, occurred_at and producer may be omitted (filled in); the record is signed with
    the identity's key and acknowledged by the broker before the command returns.
    """
    from stratamesh.bus.publish import Publisher
    from stratamesh.bus.topics import topic
    from stratamesh.events import EVENT_TYPES, new_event_id

    settings = _settings(bootstrap)
    spec = topic(topic_name)
    model = EVENT_TYPES[spec.event_type]
    text = sys.stdin.read() if str(file) == "-" else file.read_text()
    stripped = text.strip()
    docs = (
        [json.loads(stripped)]
        if stripped.startswith("{") and "\n{" not in stripped
        else [json.loads(line) for line in stripped.splitlines() if line.strip()]
    )
    events = []
    now = datetime.now().astimezone().isoformat()
    for doc in docs:
        doc.setdefault("event_id", new_event_id())
        doc.setdefault("occurred_at", now)
        doc.setdefault("producer", as_)
        try:  # JSON mode: bytes fields are base64, as `strata tail` prints them
            events.append(model.model_validate_json(json.dumps(doc)))
        except ValueError as exc:
            err.print(f"[red]error:[/red] not a valid {spec.event_type}: {exc}")
            raise typer.Exit(2) from None

    async def main() -> None:
        async with Publisher(settings, as_, unsigned=unsigned) as pub:
            for ev in events:
                md = await pub.publish(ev, topic_name=topic_name, next_stage=next_stage)
                out.print(f"{ev.event_id} → {md.topic}[{md.partition}]@{md.offset}")

    _run(main())


@app.command()
def tail(
    topic_name: Annotated[str, typer.Argument(metavar="TOPIC")],
    from_beginning: Annotated[bool, typer.Option(help="start at the oldest record")] = False,
    follow: Annotated[
        bool, typer.Option("--follow/--no-follow", help="keep waiting for new records")
    ] = False,
    limit: Annotated[int | None, typer.Option(help="stop after this many records")] = None,
    bootstrap: Bootstrap = None,
) -> None:
    """Print records of a topic, decoded, with their headers (one JSON object per line)."""
    from stratamesh.bus.inspect import tail_records

    settings = _settings(bootstrap)

    async def main() -> None:
        async for line in tail_records(
            settings, topic_name, from_beginning=from_beginning, follow=follow, limit=limit
        ):
            print(json.dumps(line, default=str), flush=True)

    with contextlib.suppress(KeyboardInterrupt):
        _run(main())


# -- topics --------------------------------------------------------------------------------


@topics_app.command("list")
def topics_list(
    bootstrap: Bootstrap = None,
    registry: Annotated[
        bool, typer.Option("--registry", help="show the registry without asking a broker")
    ] = False,
) -> None:
    """The registry's topics: event, producers → consumers, partitions, retention, DLQ twin."""
    from stratamesh.bus.admin import list_topics
    from stratamesh.bus.topics import TOPICS

    existing: dict[str, int] | None = None
    if not registry:
        existing = _run(list_topics(_settings(bootstrap)))
    table = Table(
        "topic",
        "event",
        "producers → consumers",
        "partitions",
        "retention",
        "dlq" + ("" if existing is None else " (exists)"),
    )
    for spec in TOPICS:
        parts = str(spec.partitions) if existing is None else str(existing.get(spec.name, "—"))
        dlq = (
            spec.dlq
            if existing is None
            else f"{spec.dlq} ({'yes' if spec.dlq in existing else 'no'})"
        )
        table.add_row(
            spec.name,
            spec.event_type,
            f"{' '.join(sorted(spec.producers))} → {' '.join(sorted(spec.consumers))}",
            parts,
            f"{spec.retention_ms // 86_400_000} d",
            dlq,
        )
    out.print(table)
    if existing is not None:
        others = sorted(set(existing) - {n for t in TOPICS for n in (t.name, t.dlq)})
        if others:
            out.print("other topics: " + ", ".join(f"{n} ({existing[n]})" for n in others))


@topics_app.command("create")
def topics_create(
    names: Annotated[
        list[str] | None,
        typer.Argument(help="topics (default: the whole registry and every DLQ twin)"),
    ] = None,
    partitions: Annotated[
        int | None, typer.Option(help="partition count (default: the registry's)")
    ] = None,
    replication_factor: Annotated[int, typer.Option()] = 1,
    bootstrap: Bootstrap = None,
) -> None:
    """Create the registry topics and their DLQ twins (idempotent)."""
    from stratamesh.bus.admin import ensure_topics

    result = _run(
        ensure_topics(
            _settings(bootstrap),
            names or None,
            partitions=partitions,
            replication_factor=replication_factor,
        )
    )
    created = [n for n, new in result.items() if new]
    out.print(f"created {len(created)}, already there {len(result) - len(created)}")
    for name in created:
        out.print(f"  + {name}")


@topics_app.command("describe")
def topics_describe(
    name: Annotated[str, typer.Argument(metavar="TOPIC")],
    group: Annotated[
        list[str] | None, typer.Option("--group", "-g", help="show this group's offsets and lag")
    ] = None,
    all_groups: Annotated[bool, typer.Option(help="lag of every consumer group")] = False,
    bootstrap: Bootstrap = None,
) -> None:
    """Partitions with their true end offsets, the registry entry, and consumer lag."""
    from stratamesh.bus.admin import describe_topic

    d = _run(describe_topic(_settings(bootstrap), name, groups=group, all_groups=all_groups))
    if d.spec is not None:
        out.print(
            f"[bold]{d.name}[/bold]  {d.spec.event_type}  ({d.spec.description}); "
            f"producers: {', '.join(sorted(d.spec.producers))}"
        )
    out.print(
        f"records: {d.records}   dlq: {d.dlq or '—'}"
        f"{'' if d.dlq is None else (' (exists)' if d.dlq_exists else ' (missing)')}"
    )
    table = Table("partition", "begin", "end", "records")
    for p in d.partitions:
        table.add_row(str(p.partition), str(p.begin), str(p.end), str(p.count))
    out.print(table)
    for g, lags in d.groups.items():
        out.print(
            f"group {g}: lag {sum(x.lag for x in lags)}  ("
            + ", ".join(f"p{x.partition}={x.lag}" for x in lags)
            + ")"
        )


# -- dlq -----------------------------------------------------------------------------------


@dlq_app.command("ls")
def dlq_ls(
    topic_name: Annotated[str | None, typer.Argument(metavar="[TOPIC]")] = None,
    bootstrap: Bootstrap = None,
) -> None:
    """Dead-letter topics with records, pending (not redriven) and failure classes."""
    from stratamesh.bus.dlq import list_dlq

    rows = _run(list_dlq(_settings(bootstrap), topic_name))
    table = Table("dlq topic", "records", "pending", "failure classes", "services")
    for r in rows:
        table.add_row(
            r.topic,
            str(r.records),
            str(r.pending),
            ", ".join(f"{k}={v}" for k, v in sorted(r.failure_classes.items())),
            ", ".join(sorted(r.services)),
        )
    out.print(table)


@dlq_app.command("show")
def dlq_show(
    topic_name: Annotated[str, typer.Argument(metavar="DLQ_TOPIC")],
    offset: Annotated[int | None, typer.Option(help="start at this offset")] = None,
    partition: Annotated[int | None, typer.Option()] = None,
    limit: Annotated[int, typer.Option()] = 20,
    stacktrace: Annotated[bool, typer.Option(help="include the stack traces")] = False,
    bootstrap: Bootstrap = None,
) -> None:
    """Print dead letters as JSON lines: position, failure, original envelope, decoded event."""
    from stratamesh.bus.codec import Codec
    from stratamesh.bus.dlq import read_dlq
    from stratamesh.bus.inspect import describe_record

    settings = _settings(bootstrap)
    codec = Codec.from_settings(settings)
    records = _run(read_dlq(settings, topic_name, offset, limit=limit, partition=partition))
    for r in records:
        view = describe_record(r, codec)
        dlt = {k: v for k, v in dataclasses.asdict(r.dlt).items() if v is not None}
        if not stacktrace:
            dlt.pop("exception_stacktrace", None)
        view["headers"] = {
            k: v for k, v in view["headers"].items() if not k.startswith("strata-dlt-")
        }
        view["dead_letter"] = dlt
        print(json.dumps(view, default=str))


@dlq_app.command("redrive")
def dlq_redrive(
    topic_name: Annotated[str, typer.Argument(metavar="DLQ_TOPIC")],
    offset: Annotated[
        list[str] | None,
        typer.Option(
            "--offset",
            help="PARTITION:OFFSET to redrive (repeatable); default: every pending record",
        ),
    ] = None,
    dry_run: Annotated[bool, typer.Option(help="show what would be redriven")] = False,
    bootstrap: Bootstrap = None,
) -> None:
    """Re-publish dead letters, byte-identical (key, value, original headers), to their source.

    Progress is kept in the consumer group `strata-dlq-redrive`: a record is redriven once.
    """
    from stratamesh.bus.dlq import redrive

    picks: list[int | tuple[int, int]] | None = None
    if offset:
        picks = []
        for item in offset:
            part, _, off = item.partition(":")
            picks.append((int(part), int(off)) if off else int(part))
    res = _run(redrive(_settings(bootstrap), topic_name, picks, dry_run=dry_run))
    verb = "would redrive" if res.dry_run else "redrove"
    out.print(
        f"{verb} {res.total} record(s): "
        + (", ".join(f"{t}={n}" for t, n in res.redriven.items()) or "none")
    )
    if res.already_redriven:
        out.print(f"already redriven before: {res.already_redriven}")
    for skipped in res.skipped:
        out.print(f"[yellow]skipped[/yellow] {skipped}")
    for warning in res.warnings:
        out.print(f"[yellow]warning:[/yellow] {warning}")


# -- replay --------------------------------------------------------------------------------


def _duration(text: str) -> timedelta:
    """`90s`, `15m`, `2h`, `1d`, or ISO-8601 like `PT1H30M`."""
    import re

    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([smhd])", text.strip())
    if m:
        n, unit = float(m.group(1)), m.group(2)
        return timedelta(seconds=n * {"s": 1, "m": 60, "h": 3600, "d": 86400}[unit])
    m = re.fullmatch(
        r"P(?:(\d+)D)?(?:T(?:(\d+)H)?(?:(\d+)M)?(?:(\d+(?:\.\d+)?)S)?)?", text.strip().upper()
    )
    if m and any(m.groups()):
        d, h, mi, sec = (float(x) if x else 0.0 for x in m.groups())
        return timedelta(days=d, hours=h, minutes=mi, seconds=sec)
    raise typer.BadParameter(f"not a duration: {text!r} (use 90s, 15m, 2h, 1d or PT1H)")


@replay_app.command("reset")
def replay_reset(
    group: Annotated[str, typer.Option(help="the consumer group (a service's name)")],
    topic_name: Annotated[str, typer.Option("--topic", help="the topic to rewind")],
    to_offset: Annotated[int | None, typer.Option(help="this offset on every partition")] = None,
    to_datetime: Annotated[
        str | None, typer.Option(help="first record at or after this ISO time (naive = local time)")
    ] = None,
    by_duration: Annotated[str | None, typer.Option(help="now minus this: 15m, 2h, PT1H")] = None,
    to_earliest: Annotated[bool, typer.Option()] = False,
    to_latest: Annotated[bool, typer.Option()] = False,
    execute: Annotated[
        bool, typer.Option(help="commit the new offsets (default: dry run)")
    ] = False,
    bootstrap: Bootstrap = None,
) -> None:
    """Move a stopped consumer group to an offset, a time or a duration ago (dry run unless
    --execute; refuses while the group has members, like kafka-consumer-groups)."""
    from stratamesh.bus.replay import execute_plan, plan_reset

    settings = _settings(bootstrap)
    when = None
    if to_datetime:
        when = datetime.fromisoformat(to_datetime)
        if when.tzinfo is None:
            when = when.astimezone()  # naive = local time
    plan = _run(
        plan_reset(
            settings,
            group,
            topic_name,
            to_offset=to_offset,
            to_datetime=when,
            by_duration=_duration(by_duration) if by_duration else None,
            to_earliest=to_earliest,
            to_latest=to_latest,
        )
    )
    if execute:
        plan = _run(execute_plan(settings, plan))
    table = Table("partition", "current", "target", "lag before", "lag after")
    for r in plan.rows:
        table.add_row(
            str(r.partition),
            "—" if r.current is None else str(r.current),
            str(r.target),
            str(r.lag_before),
            str(r.lag_after),
        )
    out.print(table)
    out.print(
        f"group {plan.group} on {plan.topic} ({plan.strategy}): "
        + (
            "[green]offsets committed[/green]"
            if plan.executed
            else "dry run — add --execute to commit"
        )
    )


@replay_app.command("copy")
def replay_copy(
    topic_name: Annotated[str, typer.Option("--topic")],
    from_: Annotated[
        str | None, typer.Option("--from", help="offset or ISO time (default: the beginning)")
    ] = None,
    to: Annotated[
        str | None, typer.Option(help="offset or ISO time, exclusive (default: the end)")
    ] = None,
    into: Annotated[
        str, typer.Option(help="`shadow` (→ shadow.<topic>) or a topic name")
    ] = "shadow",
    bootstrap: Bootstrap = None,
) -> None:
    """Re-publish a range of a topic into the shadow namespace, byte-identical plus the
    `strata-replay` header, for a shadow pipeline to process."""
    from stratamesh.bus.replay import copy_range

    def point(text: str | None) -> int | datetime | None:
        if text is None:
            return None
        if text.lstrip("-").isdigit():
            return int(text)
        when = datetime.fromisoformat(text)
        return when if when.tzinfo else when.astimezone()

    res = _run(
        copy_range(_settings(bootstrap), topic_name, from_=point(from_), to=point(to), into=into)
    )
    out.print(
        f"copied {res.total} record(s) {res.source} → {res.target} (strata-replay: {res.replay_id})"
    )
    for part, (start, stop) in sorted(res.ranges.items()):
        out.print(f"  p{part}: [{start}, {stop}) → {res.copied.get(part, 0)}")


@review_app.command("ls")
def review_ls(
    all_: Annotated[bool, typer.Option("--all", help="decided reviews too")] = False,
    bootstrap: Bootstrap = None,
) -> None:
    """Escalations waiting for a human (reviews.pending without a decision), oldest first."""
    from stratamesh.reviews import load_reviews

    reviews = _run(load_reviews(_settings(bootstrap)))
    table = Table("review", "request", "tenant", "age", "candidates", "reason", "decision")
    now = datetime.now().astimezone()
    shown = 0
    for r in reviews:
        if not all_ and not r.pending:
            continue
        shown += 1
        q = r.request
        minutes = (now - q.occurred_at).total_seconds() / 60
        table.add_row(
            q.event_id,
            q.request_id,
            q.tenant,
            f"{minutes:.0f} min",
            str(len(q.candidates)),
            q.reason[:60],
            "-" if r.decision is None else f"{r.decision.decision.value} by {r.decision.reviewer}",
        )
    out.print(table)
    pending = sum(r.pending for r in reviews)
    err.print(f"{pending} pending, {len(reviews) - pending} decided ({shown} shown)")


@review_app.command("show")
def review_show(
    ref: Annotated[str, typer.Argument(metavar="REVIEW", help="review or request id (prefix)")],
    bootstrap: Bootstrap = None,
) -> None:
    """The full escalation as JSON: reason, question, context, candidates, findings, trace,
    and the decision when there is one."""
    from stratamesh.reviews import find_review, load_reviews

    settings = _settings(bootstrap)

    async def main() -> Any:
        return find_review(await load_reviews(settings), ref)

    review = _run(main())
    decision = review.decision
    view = {
        "review": json.loads(review.request.model_dump_json()),
        "decision": json.loads(decision.model_dump_json()) if decision is not None else None,
    }
    out.print_json(json.dumps(view))


@review_app.command("decide")
def review_decide(
    ref: Annotated[str, typer.Argument(metavar="REVIEW", help="review or request id (prefix)")],
    approve: Annotated[bool, typer.Option("--approve", help="release a candidate")] = False,
    reject: Annotated[bool, typer.Option("--reject", help="refuse to answer")] = False,
    edit: Annotated[
        str | None, typer.Option("--edit", metavar="ANSWER", help="release this answer instead")
    ] = None,
    candidate: Annotated[int, typer.Option(min=1, help="which candidate --approve releases")] = 1,
    reviewer: Annotated[
        str, typer.Option(help="who decides (recorded in the result)", envvar="USER")
    ] = "operator",
    note: Annotated[str | None, typer.Option(help="why (shown with a rejection)")] = None,
    bootstrap: Bootstrap = None,
) -> None:
    """Record a human decision (reviews.decided, signed as `console`); guard then completes
    the request on `results`: approve/edit → ok with that answer, reject → blocked.
    Give exactly one of --approve, --reject, --edit."""
    from stratamesh.events import ReviewDecision
    from stratamesh.reviews import decide, find_review, load_reviews

    chosen = [d for d, on in (("approve", approve), ("reject", reject), ("edit", edit)) if on]
    if len(chosen) != 1:
        err.print("[red]error:[/red] give exactly one of --approve, --reject, --edit ANSWER")
        raise typer.Exit(2)
    settings = _settings(bootstrap)

    async def main() -> Any:
        review = find_review(await load_reviews(settings), ref)
        return await decide(
            settings,
            review,
            ReviewDecision(chosen[0]),
            reviewer=reviewer,
            candidate=candidate,
            answer=edit,
            note=note,
        )

    event = _run(main())  # an unknown or decided review: its message, exit code 2
    out.print(
        f"{event.decision.value}: review {event.review_event_id} (request {event.request_id})"
    )


# -- audit and cost ---------------------------------------------------------------------


def _when(text: str) -> int:
    """Epoch ms of `24h`/`7d`/`PT1H` ago, or of an ISO date/time (UTC unless it says)."""
    from datetime import UTC

    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return int((datetime.now(UTC) - _duration(text)).timestamp() * 1000)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1000)


async def _audit_store(settings: Settings, *, sign: bool = False) -> Any:
    from stratamesh.audit.store import AuditStore
    from stratamesh.security.keys import load_signing_key

    signer = load_signing_key(settings, settings.audit.identity) if sign else None
    return await AuditStore.open(settings, signer=signer)


@audit_app.command("verify")
def audit_verify(
    chain: Annotated[
        list[str] | None,
        typer.Option("--chain", "-c", help="only this chain, e.g. results/0 (repeatable)"),
    ] = None,
    from_seq: Annotated[
        int | None, typer.Option("--from-seq", help="first position of a range (per chain)")
    ] = None,
    to_seq: Annotated[
        int | None, typer.Option("--to-seq", help="last position of a range (per chain)")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the report as JSON")] = False,
) -> None:
    """Check the audit trail's hash chains; name each altered, removed, inserted or moved record.

    Checks every chain, or a range of one.

    Each record's content must hash to its stored hash, link to the previous record's hash
    and carry a valid seal (an Ed25519 signature of the audit service over its batch); each
    chain must end at its sealed head and start at its genesis or at the signed anchor a
    prune left.  Exit code 0: intact; 1: problems found (listed); 2: could not check."""
    settings = _settings(need_broker=False)

    async def main() -> Any:
        store = await _audit_store(settings)
        try:
            return await store.verify(chain, from_seq=from_seq, to_seq=to_seq)
        finally:
            await store.close()

    report = _run(main())
    if as_json:
        out.print_json(json.dumps(report.as_dict()))
    else:
        if report.findings:
            table = Table("kind", "chain", "seq", "record", "what")
            for f in report.findings:
                table.add_row(
                    f"[red]{f.kind}[/red]",
                    f.chain,
                    "-" if f.seq is None else str(f.seq),
                    "-" if f.record_id is None else str(f.record_id),
                    f.detail,
                )
            out.print(table)
        rate = report.records / report.seconds if report.seconds > 0 else 0.0
        verdict = (
            "[green]intact[/green]"
            if report.ok
            else f"[red]{len(report.findings)} problem(s)[/red]"
        )
        err.print(
            f"{verdict}: {report.records} record(s) in {report.chains} chain(s) checked in "
            f"{report.seconds:.2f} s ({rate:,.0f} records/s)"
        )
    if not report.ok:
        raise typer.Exit(1)


@audit_app.command("trace")
def audit_trace(
    request_id: Annotated[str, typer.Argument(metavar="REQUEST_ID", help="the request's id")],
    tenant: Annotated[str | None, typer.Option(help="only this tenant's records")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the steps as JSON")] = False,
) -> None:
    """A request's full path, stage by stage, from its audit records.

    Every stage in event time: its producer, model and template versions, guard verdicts,
    votes, judge scores, tokens, cost and per-stage latencies (never the prompt or answer
    text)."""
    from stratamesh.audit.trace import request_trace

    settings = _settings(need_broker=False)

    async def main() -> Any:
        store = await _audit_store(settings)
        try:
            return await request_trace(store, request_id, tenant=tenant)
        finally:
            await store.close()

    steps = _run(main())
    if not steps:
        err.print(f"[red]error:[/red] no audit records of request {request_id!r}")
        raise typer.Exit(2)
    if as_json:
        out.print_json(
            json.dumps({"request_id": request_id, "steps": [s.as_dict() for s in steps]})
        )
        return
    table = Table("+ms", "event", "producer", "model / versions", "decided", "tokens", "cost $")
    for s in steps:
        versions = " ".join(f"{k}={v}" for k, v in sorted(s.versions.items()))
        event = s.event_type + (" [yellow](replay)[/yellow]" if s.replay else "")
        if s.status != "ok":
            event = f"[red]{event} {s.status}[/red]"
        table.add_row(
            str(s.since_start_ms),
            event,
            s.producer,
            " ".join(x for x in (s.model, versions) if x)[:80],
            s.summary[:90],
            f"{s.input_tokens}/{s.output_tokens}" if s.input_tokens or s.output_tokens else "",
            f"{s.cost_usd:.6f}{'' if s.billed else ' (total)' if s.cost_usd else ''}"
            if s.cost_usd
            else "",
        )
    out.print(table)
    latency = next(
        (s.detail.get("latency_ms") for s in reversed(steps) if s.detail.get("latency_ms")), None
    )
    if latency:
        out.print("stage latency (ms): " + ", ".join(f"{k} {v:.1f}" for k, v in latency.items()))


@audit_app.command("prune")
def audit_prune(
    older_than_days: Annotated[
        int | None,
        typer.Option("--older-than-days", min=0, help="default: STRATA_AUDIT__RETENTION_DAYS"),
    ] = None,
    yes: Annotated[bool, typer.Option("--yes", help="really delete (default: dry run)")] = False,
) -> None:
    """Delete records older than the retention window; the rest still verifies.

    Per chain, a signed anchor (the last pruned record's position and hash) replaces the
    pruned records.  Needs the audit key (STRATA_AUDIT__IDENTITY, default `audit`)."""
    import sqlalchemy as sa

    from stratamesh.audit.schema import records
    from stratamesh.audit.store import now_ms

    settings = _settings(need_broker=False)
    days = settings.audit.retention_days if older_than_days is None else older_than_days
    if days <= 0 and older_than_days is None:
        err.print(
            "[red]error:[/red] the retention window is 0 (keep forever): pass "
            "--older-than-days N or set STRATA_AUDIT__RETENTION_DAYS"
        )
        raise typer.Exit(2)
    cutoff = now_ms() - days * 86_400_000

    async def main() -> Any:
        store = await _audit_store(settings, sign=yes)
        try:
            if yes:
                return await store.prune(cutoff)
            async with store.engine.connect() as conn:
                query = sa.select(sa.func.count()).where(records.c.recorded_ms < cutoff)
                return int((await conn.execute(query)).scalar() or 0)
        finally:
            await store.close()

    done = _run(main())
    if not yes:
        out.print(f"{done} record(s) recorded more than {days} day(s) ago; --yes prunes them")
        return
    for p in done:
        out.print(f"{p.chain}: pruned {p.pruned}, anchored at seq {p.anchor_seq}")
    out.print(f"pruned {sum(p.pruned for p in done)} record(s) in {len(done)} chain(s)")


@audit_app.command("erase")
def audit_erase(
    tenant: Annotated[str, typer.Option(help="the tenant whose requests mentioned the person")],
    value: Annotated[
        list[str] | None,
        typer.Option(
            "--value",
            metavar="KIND=VALUE",
            help="a value of the person as guard detects it, e.g. PERSON='Jane Doe', "
            "EMAIL_ADDRESS=jane@example.com, PHONE_NUMBER=+15550102030 (repeatable)",
        ),
    ] = None,
    pseudonym: Annotated[
        list[str] | None,
        typer.Option(help="a pseudonym to erase as is, e.g. '<PERSON_7f3a2c91d0>' (repeatable)"),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the result as JSON")] = False,
) -> None:
    """Erase a person: delete the mappings from their pseudonyms back to their values.

    A person is a data subject of a tenant; the erasure is recorded in the audit trail.

    The trail itself never holds values or pseudonyms, so it stays intact and verifiable.
    Values are turned into pseudonyms with guard's secret (STRATA_GUARD__SECRET or
    $STRATA_HOME/keys/guard.secret); the mappings live in STRATA_REDIS_URL's Redis."""
    from stratamesh.audit.erasure import erase

    pairs: list[tuple[str, str]] = []
    for item in value or []:
        kind, sep, text = item.partition("=")
        if not sep or not kind.strip() or not text:
            raise typer.BadParameter(f"expected KIND=VALUE, got {item!r}", param_hint="--value")
        pairs.append((kind.strip().upper(), text))
    settings = _settings(need_broker=False)

    async def main() -> Any:
        store = await _audit_store(settings, sign=True)
        try:
            return await erase(settings, store, tenant, values=pairs, pseudonyms=pseudonym or [])
        finally:
            await store.close()

    result = _run(main())
    if as_json:
        out.print_json(json.dumps(result.as_dict()))
        return
    out.print(
        f"erased {result.removed} of {len(result.pseudonyms)} pseudonym mapping(s) of tenant "
        f"{result.tenant} (the others had expired or never existed); recorded in "
        f"{result.record_chain}"
    )


@audit_app.command("migrate")
def audit_migrate() -> None:
    """Create or upgrade the audit tables (the service and every audit command do it too)."""
    from stratamesh.stores.sql import database_url, describe_url

    settings = _settings(need_broker=False)

    async def main() -> None:
        store = await _audit_store(settings)
        await store.close()

    _run(main())
    out.print(f"audit tables up to date in {describe_url(database_url(settings))}")


@app.command()
def cost(
    tenant: Annotated[str | None, typer.Option(help="only this tenant")] = None,
    model: Annotated[str | None, typer.Option(help="only this model (id@revision)")] = None,
    request: Annotated[str | None, typer.Option(help="only this request id")] = None,
    since: Annotated[
        str | None, typer.Option(help="from: a duration ago (24h, 7d) or an ISO date/time")
    ] = None,
    until: Annotated[str | None, typer.Option(help="until (exclusive), same forms")] = None,
    by: Annotated[
        list[str] | None,
        typer.Option(
            help="group by tenant, model and/or request (repeatable; default both tenant and model)"
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the report as JSON")] = False,
) -> None:
    """Tokens and cost from the audit trail's ledger, per tenant, model or request.

    Billed = every model call (each replica's CandidateAnswer, each revision round), once.
    Replayed events (strata-replay) are audited but not billed: shown apart."""
    from stratamesh.audit.ledger import GROUPS, cost_report

    groups = by or ["tenant", "model"]
    unknown = [g for g in groups if g not in GROUPS]
    if unknown:
        raise typer.BadParameter(f"{unknown[0]!r}: use {', '.join(GROUPS)}", param_hint="--by")
    since_ms = _when(since) if since else None
    until_ms = _when(until) if until else None
    settings = _settings(need_broker=False)

    async def main() -> Any:
        store = await _audit_store(settings)
        try:
            return await cost_report(
                store,
                by=groups,  # type: ignore[arg-type]
                tenant=tenant,
                model=model,
                request_id=request,
                since_ms=since_ms,
                until_ms=until_ms,
            )
        finally:
            await store.close()

    report = _run(main())
    if as_json:
        out.print_json(json.dumps(report.as_dict()))
        return
    table = Table(*report.by, "calls", "input tokens", "output tokens", "cost $")
    for line in report.lines:
        table.add_row(
            *(line.group[g] or "-" for g in report.by),
            str(line.calls),
            f"{line.input_tokens:,}",
            f"{line.output_tokens:,}",
            f"{line.cost_usd:.6f}",
        )
    t = report.total
    table.add_row(
        "[bold]total[/bold]",
        *([""] * (len(report.by) - 1)),
        str(t.calls),
        f"{t.input_tokens:,}",
        f"{t.output_tokens:,}",
        f"{t.cost_usd:.6f}",
    )
    out.print(table)
    if report.replayed_calls:
        err.print(
            f"not billed: {report.replayed_calls} replayed model call(s), "
            f"${report.replayed_cost_usd:.6f}"
        )


def main() -> None:
    app()


__all__ = ["app", "main"]


if __name__ == "__main__":
    main()
