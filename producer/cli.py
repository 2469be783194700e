"""``stepline``: start workflows, inspect instances, migrate the database."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.table import Table

from producer.client import Client
from producer.models import AttemptInfo, InstanceInfo
from producer.producer import Producer
from shared.db import migrate
from shared.db.engine import mask_url
from shared.errors import ConfigError, SteplineError
from shared.history import format_key
from shared.logs import configure_logging
from shared.settings import Settings, load_settings
from shared.states import InstanceStatus

T = TypeVar("T")
JSON_OPTION = click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")


def _settings(*require: str) -> Settings:
    try:
        return load_settings(require=require)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None


def _run(action: Awaitable[T]) -> T:
    try:
        return asyncio.run(action)  # type: ignore[arg-type]
    except SteplineError as exc:
        raise click.ClickException(str(exc)) from None


def _print_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


def _with_client(settings: Settings, use: Callable[[Client], Awaitable[T]]) -> T:
    async def body() -> T:
        async with Client(settings.database, namespace=settings.namespace) as client:
            return await use(client)

    return _run(body())


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Stepline: durable workflows on PostgreSQL and RabbitMQ.

    Reads STEPLINE_DATABASE_URL and STEPLINE_AMQP_URL.
    """
    configure_logging("stepline", level="WARNING")


@main.command()
@click.argument("workflow")
@click.option("--params", default="null", help='Params as JSON, e.g. \'{"sku": "A1"}\'.')
@click.option("--id", "instance_id", default=None, help="Instance id (default: a new UUID).")
@JSON_OPTION
def start(workflow: str, params: str, instance_id: str | None, as_json: bool) -> None:
    """Publish a start event for WORKFLOW; prints the instance id. Needs STEPLINE_AMQP_URL."""
    try:
        parsed = json.loads(params)
    except ValueError as exc:
        raise click.BadParameter(f"not JSON: {exc}", param_hint="--params") from None
    settings = _settings("amqp_url")

    async def body() -> str:
        async with Producer(
            settings.amqp, namespace=settings.namespace, max_payload_bytes=settings.max_payload_bytes
        ) as producer:
            return await producer.start(workflow, parsed, instance_id=instance_id)

    started = _run(body())
    if as_json:
        _print_json({"instance_id": started, "workflow": workflow})
    else:
        click.echo(started)


@main.command()
@click.argument("instance_id")
@JSON_OPTION
def status(instance_id: str, as_json: bool) -> None:
    """Show an instance: status, output or error, and its steps."""
    info = _with_client(_settings("database_url"), lambda client: client.get(instance_id))
    if info is None:
        raise click.ClickException(f"no instance with id {instance_id!r}")
    if as_json:
        _print_json(info.model_dump(mode="json"))
        return
    console = Console()
    console.print(f"[bold]{info.id}[/bold]  {info.workflow}  [bold]{info.status}[/bold]")
    console.print(f"created {info.created_at:%Y-%m-%d %H:%M:%S}  finished {_time(info.finished_at)}")
    if info.output is not None:
        console.print(f"output: {json.dumps(info.output)}")
    if info.error:
        console.print(f"[red]error: {info.error.get('type')}: {info.error.get('message')}[/red]")
    console.print(_steps_table(info))


@main.command(name="list")
@click.option("--workflow", default=None, help="Only this workflow.")
@click.option(
    "--status",
    "status_",
    type=click.Choice([s.value for s in InstanceStatus]),
    default=None,
    help="Only this status.",
)
@click.option("--limit", type=click.IntRange(1, 10000), default=50, show_default=True)
@JSON_OPTION
def list_(workflow: str | None, status_: str | None, limit: int, as_json: bool) -> None:
    """List instances, newest first."""
    infos = _with_client(
        _settings("database_url"), lambda client: client.list(workflow=workflow, status=status_, limit=limit)
    )
    if as_json:
        _print_json([info.model_dump(mode="json", exclude={"steps"}) for info in infos])
        return
    table = Table("id", "workflow", "status", "created", "finished")
    for info in infos:
        table.add_row(info.id, info.workflow, info.status, _time(info.created_at), _time(info.finished_at))
    Console().print(table)


@main.command()
@click.argument("instance_id")
@JSON_OPTION
def history(instance_id: str, as_json: bool) -> None:
    """Show an instance's step timeline: every attempt, its worker, timing and outcome."""

    async def use(client: Client) -> tuple[InstanceInfo | None, list[AttemptInfo]]:
        return await client.get(instance_id), await client.attempts(instance_id)

    info, attempts = _with_client(_settings("database_url"), use)
    if info is None:
        raise click.ClickException(f"no instance with id {instance_id!r}")
    if as_json:
        _print_json(
            {
                "instance": info.model_dump(mode="json"),
                "attempts": [attempt.model_dump(mode="json") for attempt in attempts],
            }
        )
        return
    table = Table("step", "attempt", "worker", "started", "duration", "outcome", "error")
    for attempt in attempts:
        error = attempt.error or {}
        table.add_row(
            format_key((attempt.step, attempt.occurrence)),
            str(attempt.attempt),
            attempt.worker,
            _time(attempt.started_at),
            f"{attempt.duration_s * 1000:.0f} ms",
            attempt.outcome,
            f"{error.get('type', '')}: {error.get('message', '')}" if error else "",
        )
    console = Console()
    console.print(f"[bold]{info.id}[/bold]  {info.workflow}  [bold]{info.status}[/bold]")
    console.print(_steps_table(info))
    console.print(table)


@main.group()
def db() -> None:
    """Database schema commands."""


@db.command()
def upgrade() -> None:
    """Apply every migration to the database (safe to repeat)."""
    settings = _settings("database_url")
    try:
        migrate.upgrade(settings.database)
    except Exception as exc:  # CLI edge: one clear line instead of a traceback
        first_line = str(exc).splitlines()[0] if str(exc) else ""
        raise click.ClickException(
            f"migration failed on {mask_url(settings.database)}: {type(exc).__name__}: {first_line}"
        ) from None
    click.echo(f"database at revision {migrate.current_revision(settings.database)} (head)")


def _steps_table(info: InstanceInfo) -> Table:
    table = Table("step", "kind", "status", "attempts", "started", "finished", "result / error")
    for step in info.steps:
        detail = (
            json.dumps(step.result)
            if step.error is None
            else f"{step.error.get('type')}: {step.error.get('message')}"
        )
        table.add_row(
            format_key((step.name, step.occurrence)),
            step.kind,
            step.status,
            str(step.attempts),
            _time(step.started_at),
            _time(step.finished_at),
            detail if len(detail) < 80 else detail[:77] + "...",
        )
    return table


def _time(value: Any) -> str:
    return "-" if value is None else f"{value:%Y-%m-%d %H:%M:%S}"


if __name__ == "__main__":
    sys.exit(main())
