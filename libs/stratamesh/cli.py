"""The `strata` command line."""

import asyncio
import json
import sys
from collections.abc import Coroutine
from datetime import UTC, datetime
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
replay_app = typer.Typer(help="Reset consumer groups; copy topic ranges into the shadow "
                         "namespace.", no_args_is_help=True)
app.add_typer(topics_app, name="topics")
app.add_typer(keys_app, name="keys")
app.add_typer(dlq_app, name="dlq")
app.add_typer(replay_app, name="replay")

out = Console()
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
    err.print("[red]error:[/red] no broker: start one with `strata up` (in another terminal), "
              "or set STRATA_BOOTSTRAP_SERVERS=HOST:PORT, or pass --bootstrap")
    raise typer.Exit(2)


Bootstrap = Annotated[str | None, typer.Option("--bootstrap", "-b", help="HOST:PORT of a "
                                               "Kafka broker (default: STRATA_BOOTSTRAP_SERVERS,"
                                               " then the broker of `strata up`)")]


# -- up / run ----------------------------------------------------------------------------


@app.command()
def up(
    bootstrap: Bootstrap = None,
    service: Annotated[list[str] | None, typer.Option(
        "--service", "-s", help="run only these services (repeatable)")] = None,
    metrics_port: Annotated[int | None, typer.Option(help="serve /metrics here")] = None,
) -> None:
    """Run the whole mesh in one process: the broker, the topics and every installed service.

    Without --bootstrap (or STRATA_BOOTSTRAP_SERVERS) an embedded Tansu broker is started on
    a free loopback port (memory storage: data is gone when it stops).  Missing service keys
    and a development client `client:local` (tenant `local`) are created under
    $STRATA_HOME/keys.  Ctrl-C stops everything cleanly.
    """
    from stratamesh.embedded.registry import discover_services
    from stratamesh.embedded.up import DEV_CLIENT, DEV_TENANT, Mesh, start_metrics
    from stratamesh.obs.logging import configure_logging

    settings = Settings()
    if metrics_port is not None:
        settings = settings.model_copy(update={"metrics_port": metrics_port})
    configure_logging(settings.log_level, json=not sys.stderr.isatty())

    async def main() -> None:
        mesh = await Mesh.start(settings, bootstrap=bootstrap, only=service)
        port = start_metrics(mesh.settings)
        names = [s.identity for s in mesh.services] or ["none installed yet"]
        out.print(f"[green]stratamesh is up[/green]  broker [bold]"
                  f"{mesh.settings.bootstrap_servers}[/bold]"
                  f"{' (embedded)' if mesh.broker else ''}")
        out.print(f"  services: {', '.join(names)}   "
                  f"(installed: {', '.join(discover_services()) or 'none'})")
        if port:
            out.print(f"  metrics:  http://127.0.0.1:{port}/metrics")
        out.print(f"  publish as client:{DEV_CLIENT} (tenant {DEV_TENANT}):  strata publish "
                  f"requests.submitted --as client:{DEV_CLIENT} --file EVENT.json")
        out.print("  Ctrl-C to stop.")
        await mesh.run_until_signalled()
        out.print("stopped.")

    _run(main())


@app.command()
def run(
    name: Annotated[str, typer.Argument(help="the service to run, e.g. guard")],
    identity: Annotated[str | None, typer.Option(help="signing identity, e.g. infer.r1 "
                                                 "(default: the service name)")] = None,
    shadow: Annotated[bool, typer.Option(help="consume and produce shadow.<topic>")] = False,
    bootstrap: Bootstrap = None,
) -> None:
    """Run one service until Ctrl-C (its key must exist: `strata keys gen NAME`)."""
    from stratamesh.bus.service import Service
    from stratamesh.embedded.registry import load_service
    from stratamesh.obs.logging import configure_logging

    settings = _settings(bootstrap)
    configure_logging(settings.log_level, json=settings.log_json, service=name)
    template = load_service(name)
    svc = Service(template.name, identity=identity or template.identity, shadow=shadow)
    for sub in template.subscriptions.values():
        svc.subscribe(sub.topic, stage=sub.stage)(sub.handler)

    async def main() -> None:
        import signal

        await svc.start(settings)
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        waiter = asyncio.create_task(svc.wait())
        await asyncio.wait([waiter, asyncio.create_task(stop.wait())],
                           return_when=asyncio.FIRST_COMPLETED)
        await svc.stop()

    _run(main())


# -- keys ----------------------------------------------------------------------------------


@keys_app.command("gen")
def keys_gen(
    identity: Annotated[list[str] | None, typer.Argument(
        help="service identities, e.g. guard infer.r1")] = None,
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
    file: Annotated[Path, typer.Option("--file", "-f", help="JSON event (or JSON lines); "
                                       "'-' reads standard input")],
    as_: Annotated[str, typer.Option("--as", help="signing identity, e.g. client:local")],
    next_stage: Annotated[str | None, typer.Option("--next", help="strata-next header")] = None,
    unsigned: Annotated[bool, typer.Option(help="send without a signature (only accepted "
                                           "when unsigned ingress is enabled)")] = False,
    bootstrap: Bootstrap = None,
) -> None:
    """Publish events (JSON matching the topic's event type; event_id may be omitted)."""
    from stratamesh.bus.publish import Publisher
    from stratamesh.bus.topics import topic
    from stratamesh.events import EVENT_TYPES, new_event_id

    settings = _settings(bootstrap)
    spec = topic(topic_name)
    model = EVENT_TYPES[spec.event_type]
    text = sys.stdin.read() if str(file) == "-" else file.read_text()
    stripped = text.strip()
    docs = [json.loads(stripped)] if stripped.startswith("{") and "\n{" not in stripped \
        else [json.loads(line) for line in stripped.splitlines() if line.strip()]
    events = []
    for doc in docs:
        doc.setdefault("event_id", new_event_id())
        events.append(model.model_validate(doc))

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
    follow: Annotated[bool, typer.Option("--follow/--no-follow", help="keep waiting for new "
                                         "records")] = False,
    limit: Annotated[int | None, typer.Option(help="stop after this many records")] = None,
    bootstrap: Bootstrap = None,
) -> None:
    """Print records of a topic, decoded, with their headers (one JSON object per line)."""
    from stratamesh.bus.inspect import tail_records

    settings = _settings(bootstrap)

    async def main() -> None:
        async for line in tail_records(settings, topic_name, from_beginning=from_beginning,
                                       follow=follow, limit=limit):
            print(json.dumps(line, default=str), flush=True)

    try:
        _run(main())
    except KeyboardInterrupt:
        pass


def _parse_when(text: str) -> datetime:
    when = datetime.fromisoformat(text)
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def main() -> None:
    app()


__all__ = ["app", "main"]
