"""``stepline``'s instance commands: start workflows, inspect instances, migrate the database.

``stepline.cli`` lists them in its command table and imports this module only to run one,
so its imports stay those every command here needs: a command's own heavy imports (the
producer, the fleet, migrations, the client) happen inside it.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click
from rich.console import Console
from rich.table import Table
from rich.text import Text

from stepline.shared.durations import parse_duration
from stepline.shared.errors import ConfigError, InvalidIdError, SteplineError
from stepline.shared.history import format_key
from stepline.shared.messages import check_event_id, check_id_prefix, check_instance_id
from stepline.shared.process import run_until_signalled
from stepline.shared.settings import Settings, load_settings
from stepline.shared.states import InstanceStatus

if TYPE_CHECKING:
    from stepline.producer.client import Client
    from stepline.producer.models import AttemptInfo, EventInfo, InstanceInfo, PoolWait
    from stepline.shared.broker import WorkflowQueue

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


_IdCallback = Callable[[click.Context, click.Parameter, str | None], str | None]


def _checked(check: Callable[[str], str]) -> _IdCallback:
    """A click callback that refuses an id ``check`` refuses, with its one-line reason.

    A ``ClickException`` rather than ``BadParameter``: the library's own sentence, on one line,
    before any setting is read or any connection opened.
    """

    def callback(_ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            return check(value)
        except InvalidIdError as exc:
            raise click.ClickException(str(exc)) from None

    return callback


INSTANCE_ID = click.argument("instance_id", callback=_checked(check_instance_id))


def _print_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


def _with_client(settings: Settings, use: Callable[[Client], Awaitable[T]], *, publishes: bool = False) -> T:
    from stepline.producer.client import Client
    from stepline.shared.codec import load_codec

    async def body() -> T:
        async with Client(
            settings.database,
            settings.amqp if publishes else None,
            namespace=settings.namespace,
            max_payload_bytes=settings.max_payload_bytes,
            broker=settings.broker,
            database=settings.db,
            codec=load_codec(settings.codec, settings),
            payload=settings.payload,
        ) as client:
            return await use(client)

    return _run(body())


@click.command()
@click.argument("workflow")
@click.option("--params", default="null", help='Params as JSON, e.g. \'{"sku": "A1"}\'.')
@click.option(
    "--id",
    "instance_id",
    default=None,
    callback=_checked(check_instance_id),
    help="Instance id (default: a new UUID): printable text, no control characters, 512 at most.",
)
@click.option(
    "--allow-unregistered",
    is_flag=True,
    help="Queue the start even if no worker serving WORKFLOW has run yet; it waits until one runs.",
)
@click.option(
    "--priority",
    type=click.IntRange(0, 9),
    default=0,
    show_default=True,
    help="0 to 9: higher starts first among the instances a concurrency limit keeps queued.",
)
@JSON_OPTION
def start(
    workflow: str,
    params: str,
    instance_id: str | None,
    allow_unregistered: bool,
    priority: int,
    as_json: bool,
) -> None:
    """Publish a start event for WORKFLOW; prints the instance id. Needs STEPLINE_AMQP_URL.

    WORKFLOW must be served by a worker that has run in the namespace, unless
    --allow-unregistered is given: a mistyped name fails instead of waiting forever.
    """
    try:
        parsed = json.loads(params)
    except ValueError as exc:
        raise click.BadParameter(f"not JSON: {exc}", param_hint="--params") from None
    from stepline.producer.producer import Producer

    settings = _settings("amqp_url")

    async def body() -> tuple[str, WorkflowQueue | None]:
        async with Producer.from_settings(settings) as producer:
            started = await producer.start(
                workflow,
                parsed,
                instance_id=instance_id,
                allow_unregistered=allow_unregistered,
                priority=priority,
            )
            return started, await producer.workflow_queue(workflow)

    started, queue = _run(body())
    if queue is not None and queue.consumers == 0:
        # Not an error (a start published while no worker runs waits for one), but worth a word:
        # nothing will happen until a worker serving the workflow runs.
        click.echo(
            f"note: no worker serving {workflow!r} runs now; the start waits in its queue until one does",
            err=True,
        )
    if as_json:
        _print_json({"instance_id": started, "workflow": workflow})
    else:
        click.echo(started)


@click.command()
@INSTANCE_ID
@JSON_OPTION
def status(instance_id: str, as_json: bool) -> None:
    """Show an instance: status, output or error, its steps and its trace id.

    With STEPLINE_JAEGER_URL set, also a link to the instance's trace in Jaeger.
    """
    from stepline.producer.pool_status import pool_waits, pool_waits_json

    settings = _settings("database_url")
    info = _get(settings, instance_id)
    if info is None:
        raise _not_yet_an_instance(instance_id)
    trace_id, trace_url = _trace_link(info, settings)
    waits, problem = pool_waits(settings, info)
    if as_json:
        _print_json(
            {
                **info.model_dump(mode="json"),
                "trace_id": trace_id,
                "trace_url": trace_url,
                "pool_waits": pool_waits_json(waits, problem),
            }
        )
        return
    console = _console()
    console.print(_headline(info))
    _print_trace(console, trace_id, trace_url)
    console.print(f"created {info.created_at:%Y-%m-%d %H:%M:%S}  finished {_time(info.finished_at)}")
    _print_build(console, info)
    _print_flow(console, info)
    if info.output is not None:
        console.print(_plain(f"output: {json.dumps(info.output)}"))
    if info.error:
        console.print(_plain(f"error: {info.error.get('type')}: {info.error.get('message')}", "red"))
    console.print(_steps_table(info))
    _print_heartbeats(console, info)
    _print_pool_waits(console, waits, problem)


def _get(settings: Settings, instance_id: str) -> InstanceInfo | None:
    """``Client.get``: on PostgreSQL, read without SQLAlchemy where it can be (issue 23).

    SQLAlchemy was most of ``stepline status``'s time. A plain read (``plain_read``) takes
    the same rows and shows them as ``Client.get`` does; anything else (SQLite, payloads
    stored apart, a URL libpq cannot take, a database error to word) goes through the client.
    """
    from stepline.producer.instance_rows import payload_values, with_shown
    from stepline.shared.codec import Payloads, is_offloaded, load_codec
    from stepline.shared.db.plain_read import NotPlain, read_instance_rows
    from stepline.shared.process import process_name
    from stepline.shared.settings import CLIENT_PROCESS

    def through_client() -> InstanceInfo | None:
        return _with_client(settings, lambda client: client.get(instance_id))

    try:
        found = read_instance_rows(settings.database, process_name(CLIENT_PROCESS), instance_id)
    except NotPlain:
        return through_client()
    if found is None:
        return None
    row, step_rows = found
    values = payload_values(row, step_rows)
    if any(is_offloaded(value) for value in values):
        return through_client()  # it reads stored payloads back
    try:
        payloads = Payloads(load_codec(settings.codec, settings))
    except SteplineError as exc:
        raise click.ClickException(str(exc)) from None
    return with_shown(row, step_rows, [payloads.show(value) for value in values])


def _not_yet_an_instance(instance_id: str) -> click.ClickException:
    """The error for an id with no instance: its start may still wait for a worker.

    The database cannot tell which workflow an unknown id was started for, so
    the message covers both a wrong id and a start still queued.
    """
    return click.ClickException(
        f"no instance has id {instance_id!r} yet; if a start with this id was published, "
        "it is still queued until a worker serving its workflow takes it"
    )


@click.command(name="list")
@click.option(
    "--workflow", default=None, help="Only this workflow: its exact name (no wildcards; '%' is a character)."
)
@click.option(
    "--status",
    "status_",
    type=click.Choice([s.value for s in InstanceStatus]),
    default=None,
    help="Only this status, matched exactly.",
)
@click.option(
    "--prefix",
    default=None,
    callback=_checked(check_id_prefix),
    help="Only ids that start with this text: exact and case-sensitive ('%' and '_' are characters).",
)
@click.option(
    "--build",
    "build_id",
    metavar="ID",
    default=None,
    help="Only instances started by a worker of this build id, matched exactly.",
)
@click.option("--since", type=click.DateTime(), default=None, help="Created at or after (UTC).")
@click.option("--until", type=click.DateTime(), default=None, help="Created before (UTC).")
@click.option("--limit", type=click.IntRange(1, 10000), default=50, show_default=True, help="Page size.")
@click.option("--page", type=click.IntRange(1), default=1, show_default=True, help="Page number.")
@JSON_OPTION
def list_(
    workflow: str | None,
    status_: str | None,
    prefix: str | None,
    build_id: str | None,
    since: datetime | None,
    until: datetime | None,
    limit: int,
    page: int,
    as_json: bool,
) -> None:
    """List instances, newest first, a page at a time."""
    infos = _with_client(
        _settings("database_url"),
        lambda client: client.list(
            workflow=workflow,
            status=status_,
            id_prefix=prefix,
            build_id=build_id,
            limit=limit,
            offset=(page - 1) * limit,
            created_after=_utc(since),
            created_before=_utc(until),
        ),
    )
    if as_json:
        _print_json([info.model_dump(mode="json", exclude={"steps"}) for info in infos])
        return
    table = Table(
        "id", "workflow", "status", "priority", "build", "created", "finished", title=f"page {page}"
    )
    for info in infos:
        table.add_row(
            _plain(info.id),
            _plain(info.workflow),
            _plain(_status_text(info, brief=True)),
            str(info.priority),
            _plain(info.build_id or "-"),
            _time(info.created_at),
            _time(info.finished_at),
        )
    _console().print(table)


@click.command(name="send-event")
@INSTANCE_ID
@click.argument("event_type")
@click.option("--payload", default="null", help="Payload as JSON.")
@click.option(
    "--event-id",
    default=None,
    callback=_checked(check_event_id),
    help="Event id (default: a new UUID); resending it is harmless.",
)
@JSON_OPTION
def send_event(instance_id: str, event_type: str, payload: str, event_id: str | None, as_json: bool) -> None:
    """Send an event of EVENT_TYPE to an instance; its earliest matching wait takes it."""
    try:
        parsed = json.loads(payload)
    except ValueError as exc:
        raise click.BadParameter(f"not JSON: {exc}", param_hint="--payload") from None
    sent = _with_client(
        _settings("database_url", "amqp_url"),
        lambda client: client.send_event(instance_id, event_type, parsed, event_id=event_id),
        publishes=True,
    )
    if as_json:
        _print_json({"instance_id": instance_id, "event_type": event_type, "event_id": sent})
    else:
        click.echo(sent)


@click.command()
@click.option("--older-than", required=True, help="Age of finished instances to delete, e.g. 30d.")
@click.option("--batch-size", type=click.IntRange(1, 100000), default=500, show_default=True)
@JSON_OPTION
def prune(older_than: str, batch_size: int, as_json: bool) -> None:
    """Delete instances finished longer ago than --older-than, with all their rows, in batches."""
    from rich.progress import Progress, SpinnerColumn, TextColumn  # only prune draws a progress bar

    try:
        age = parse_duration(older_than)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--older-than") from None
    with Progress(
        SpinnerColumn(), TextColumn("{task.description}"), console=Console(stderr=True), disable=as_json
    ) as progress:
        task = progress.add_task("pruning", total=None)

        def report(total: int) -> None:
            progress.update(task, description=f"deleted {total} instances")

        deleted = _with_client(
            _settings("database_url"),
            lambda client: client.prune(age, batch_size=batch_size, progress=report),
        )
    if as_json:
        _print_json({"deleted": deleted, "older_than_s": age.total_seconds()})
    else:
        click.echo(f"deleted {deleted} instances finished more than {older_than} ago")


@click.command()
@INSTANCE_ID
@JSON_OPTION
def history(instance_id: str, as_json: bool) -> None:
    """Show an instance's step timeline: every attempt, its worker, timing and outcome.

    Also prints the instance's trace id, and with STEPLINE_JAEGER_URL set a link to the trace in Jaeger.
    """
    from stepline.producer.pool_status import pool_waits, pool_waits_json

    async def use(
        client: Client,
    ) -> tuple[InstanceInfo | None, list[AttemptInfo], list[EventInfo], list[dict[str, Any]]]:
        return (
            await client.get(instance_id),
            await client.attempts(instance_id),
            await client.events(instance_id),
            await client.recorded_values(instance_id),
        )

    settings = _settings("database_url")
    info, attempts, events, values = _with_client(settings, use)
    if info is None:
        raise _not_yet_an_instance(instance_id)
    trace_id, trace_url = _trace_link(info, settings)
    waits, problem = pool_waits(settings, info)
    if as_json:
        _print_json(
            {
                "instance": info.model_dump(mode="json"),
                "trace_id": trace_id,
                "trace_url": trace_url,
                "pool_waits": pool_waits_json(waits, problem),
                "attempts": [attempt.model_dump(mode="json") for attempt in attempts],
                "events": [event.model_dump(mode="json") for event in events],
                # ctx.now()/random()/uuid() as recorded: stepline.worker.testing.check_replay needs them.
                "recorded_values": values,
            }
        )
        return
    table = Table(
        "step", "attempt", "worker", "build", "started", "took", "outcome", "error", title="attempts"
    )
    for attempt in attempts:
        error = attempt.error or {}
        table.add_row(
            _plain(format_key((attempt.step, attempt.occurrence))),
            str(attempt.attempt),
            _plain(attempt.worker),
            _plain(attempt.build_id or "-"),
            _clock(attempt.started_at),
            f"{attempt.duration_s * 1000:.0f} ms",
            _plain(
                attempt.outcome
                if attempt.retry_at is None
                else f"{attempt.outcome}, retry at {_clock(attempt.retry_at)}"
            ),
            _plain(f"{error.get('type', '')}: {error.get('message', '')}" if error else ""),
        )
    console = _console()
    console.print(_headline(info))
    _print_trace(console, trace_id, trace_url)
    _print_build(console, info)
    console.print(_steps_table(info))
    _print_heartbeats(console, info)
    _print_pool_waits(console, waits, problem)
    console.print(table)
    if events:
        event_table = Table("event", "type", "received", "taken by", title="events")
        for event in events:
            event_table.add_row(
                _plain(event.event_id),
                _plain(event.event_type),
                _time(event.created_at),
                _plain(event.consumed_by or "(kept)"),
            )
        console.print(event_table)


@click.command()
@click.option("--workers", type=click.IntRange(0, 64), default=2, show_default=True, help="Worker processes.")
@click.option(
    "--schedulers", type=click.IntRange(0, 16), default=1, show_default=True, help="Scheduler processes."
)
@click.option(
    "--workflows",
    "modules",
    multiple=True,
    metavar="MODULE",
    help="Module defining workflows, for the workers (repeatable). Env: STEPLINE_WORKER__WORKFLOWS.",
)
@click.option("--concurrency", type=click.IntRange(1, 1024), default=None, help="Steps at once per worker.")
@click.option(
    "--log-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Write each process's log to DIR/NAME.log (default: this terminal).",
)
def fleet(
    workers: int, schedulers: int, modules: tuple[str, ...], concurrency: int | None, log_dir: Path | None
) -> None:
    """Run workers and schedulers as local processes; restart any that crash; stop all on SIGTERM.

    The same topology as docker-compose, without Docker. Needs STEPLINE_DATABASE_URL and STEPLINE_AMQP_URL.
    """
    from stepline.producer.fleet import Fleet, run_fleet
    from stepline.shared.logs import configure_logging

    configure_logging("fleet", level="INFO")
    settings = _settings("database_url", "amqp_url")
    workflows = list(modules) or settings.worker.workflows
    if workers and not workflows:
        raise click.UsageError("workers need --workflows MODULE (or STEPLINE_WORKER__WORKFLOWS)")
    if log_dir is not None:
        log_dir.mkdir(parents=True, exist_ok=True)
    supervised = Fleet(
        workers=workers,
        schedulers=schedulers,
        workflows=workflows,
        concurrency=concurrency,
        log_dir=log_dir,
        say=lambda line: click.echo(line, err=False),
    )
    grace = settings.worker.shutdown_grace.total_seconds() + 5
    run_until_signalled("stepline fleet", lambda stopping: run_fleet(supervised, stopping, grace_s=grace))


@click.command()
@click.option(
    "--workflows",
    "modules",
    multiple=True,
    metavar="MODULE",
    help="Module defining workflows (repeatable). Env: STEPLINE_WORKER__WORKFLOWS.",
)
@click.option(
    "--state",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path(".stepline"),
    show_default=True,
    envvar="STEPLINE_EMBEDDED",
    help="Directory of the state and the queue (SQLite files). Env: STEPLINE_EMBEDDED.",
)
@click.option("--concurrency", type=click.IntRange(1, 1024), default=None, help="Steps at once.")
@click.option(
    "--ui-port",
    type=click.IntRange(0, 65535),
    default=8080,
    show_default=True,
    envvar="STEPLINE_UI__PORT",
    help="Port of the web dashboard on 127.0.0.1 (0: any free one). Env: STEPLINE_UI__PORT.",
)
@click.option("--no-ui", is_flag=True, help="Do not serve the web dashboard.")
def dev(modules: tuple[str, ...], state: Path, concurrency: int | None, ui_port: int, no_ui: bool) -> None:
    """Run Stepline on local files, with no PostgreSQL and no RabbitMQ.

    Starts a worker, a scheduler and the web dashboard (`stepline ui`) over
    SQLite files in --state, restarts them if they crash, and stops them on
    Ctrl-C. Workflows survive a restart: run it again and they go on from
    their last committed step. Point the other
    commands at the same state with STEPLINE_EMBEDDED=DIR.
    """
    from stepline.producer.fleet import BIN, Fleet, Member, run_fleet
    from stepline.shared.logs import configure_logging

    configure_logging("dev", level="INFO")
    state = state.resolve()
    os.environ["STEPLINE_EMBEDDED"] = str(state)  # the worker and scheduler inherit it
    settings = _settings()
    workflows = list(modules) or settings.worker.workflows
    if not workflows:
        raise click.UsageError("give --workflows MODULE (or STEPLINE_WORKER__WORKFLOWS)")
    _upgrade(settings)
    click.echo(
        f"stepline dev: state in {state}\n  other commands use it with: export STEPLINE_EMBEDDED={state}"
    )
    supervised = Fleet(
        workers=1,  # one process consumes an embedded queue
        schedulers=1,
        workflows=workflows,
        concurrency=concurrency,
        say=lambda line: click.echo(line, err=False),
    )
    if not no_ui:
        supervised.members.append(Member("ui", [str(BIN / "stepline"), "ui", "--port", str(ui_port)]))
        where = f"http://127.0.0.1:{ui_port}/" if ui_port else "its address is in the ui's first line"
        click.echo(f"  dashboard: {where}")
    grace = settings.worker.shutdown_grace.total_seconds() + 5
    run_until_signalled("stepline dev", lambda stopping: run_fleet(supervised, stopping, grace_s=grace))


@click.group()
def db() -> None:
    """Database schema commands."""


@db.command()
def upgrade() -> None:
    """Apply every migration to the database (safe to repeat)."""
    from stepline.shared.db import migrate

    settings = _settings("database_url")
    _upgrade(settings)
    click.echo(f"database at revision {migrate.current_revision(settings.database)} (head)")


def _upgrade(settings: Settings) -> None:
    from stepline.shared.db import stores
    from stepline.shared.redaction import mask_url, scrub_password

    try:
        stores.upgrade(settings.database)
    except Exception as exc:  # CLI edge: one clear line instead of a traceback
        first_line = str(exc).splitlines()[0] if str(exc) else ""
        raise click.ClickException(
            f"migration failed on {mask_url(settings.database)}: {type(exc).__name__}: "
            f"{scrub_password(first_line, settings.database)}"
        ) from None


_TRACE_ID = re.compile(r"[0-9a-f]{32}")
_SPAN_ID = re.compile(r"[0-9a-f]{16}")
_HEX_BYTE = re.compile(r"[0-9a-f]{2}")


def trace_id_of(traceparent: str | None) -> str | None:
    """The trace id of a W3C ``traceparent`` (``00-<32 hex trace id>-<16 hex span id>-<2 hex flags>``).

    None when there is none or it is malformed (including the all-zero ids the spec calls invalid).
    """
    if not traceparent:
        return None
    parts = traceparent.strip().lower().split("-")
    if len(parts) < 4:
        return None
    version, trace_id, span_id, flags = parts[:4]
    if not _HEX_BYTE.fullmatch(version) or version == "ff" or (version == "00" and len(parts) != 4):
        return None
    if not (_TRACE_ID.fullmatch(trace_id) and _SPAN_ID.fullmatch(span_id) and _HEX_BYTE.fullmatch(flags)):
        return None
    if trace_id == "0" * 32 or span_id == "0" * 16:
        return None
    return trace_id


def _trace_link(info: InstanceInfo, settings: Settings) -> tuple[str | None, str | None]:
    """The instance's trace id, and its Jaeger URL when STEPLINE_JAEGER_URL is set."""
    trace_id = trace_id_of((info.trace_context or {}).get("traceparent"))
    if trace_id is None or settings.jaeger_url is None:
        return trace_id, None
    return trace_id, f"{settings.jaeger_url}/trace/{trace_id}"


def _print_trace(console: Console, trace_id: str | None, trace_url: str | None) -> None:
    if trace_id is None:
        return
    link = f"  [link={trace_url}]{trace_url}[/link]" if trace_url else ""
    console.print(f"trace {trace_id}{link}", soft_wrap=True)


def _print_build(console: Console, info: InstanceInfo) -> None:
    """The build that started the instance (none is kept for one started before build ids were)."""
    if info.build_id is not None:
        console.print(_plain(f"started by build {info.build_id}"))


def _print_flow(console: Console, info: InstanceInfo) -> None:
    """Its priority, and its key under a concurrency limit (if its workflow has one)."""
    line = f"priority {info.priority}"
    if info.concurrency_key is not None:
        line += (
            f"  concurrency key {info.concurrency_key!r}"
            if info.concurrency_key
            else "  concurrency: whole workflow"
        )
    console.print(_plain(line))


def _console() -> Console:
    """A console that keeps table rows on one line when output goes to a file or a pipe."""
    console = Console()
    if not console.is_terminal:
        console.width = max(console.width, 160)  # history's attempts table has 8 columns
    return console


def _print_pool_waits(console: Console, waits: list[PoolWait], problem: str | None) -> None:
    """A line per step bound for a worker pool: above all, one that no worker consumes now."""
    from stepline.producer.pool_status import pool_wait_lines

    for line, is_warning in pool_wait_lines(waits, problem):
        console.print(_plain(line, "yellow" if is_warning else ""), soft_wrap=True)


def _steps_table(info: InstanceInfo) -> Table:
    pooled = any(step.pool is not None for step in info.steps)
    columns = ["step", "kind", *(["pool"] if pooled else []), "status", "attempts", "started", "took"]
    table = Table(*columns, "result / error", title="steps")
    for step in info.steps:
        detail = (
            json.dumps(step.result)
            if step.error is None
            else f"{step.error.get('type')}: {step.error.get('message')}"
        )
        if step.waiting_for is not None:
            detail = step.waiting_for
        took = (
            f"{(step.finished_at - step.started_at).total_seconds() * 1000:.0f} ms"
            if step.started_at and step.finished_at
            else "-"
        )
        detail = _printable(detail)  # escaped before it is cut, so a cut never splits an escape
        table.add_row(
            _plain(format_key((step.name, step.occurrence))),
            _plain(step.kind),
            *([_plain(step.pool or "-")] if pooled else []),
            _plain(step.status),
            str(step.attempts),
            _clock(step.started_at),
            took,
            _plain(detail if len(detail) < 60 else detail[:57] + "..."),
        )
    return table


def _print_heartbeats(console: Console, info: InstanceInfo) -> None:
    """Each long step's last heartbeat: when, and its details (``<encrypted>`` without the key)."""
    beating = [step for step in info.steps if step.heartbeat_at is not None]
    if not beating:
        return
    table = Table("step", "at", "details", title="last heartbeats")
    for step in beating:
        details = _printable(json.dumps(step.heartbeat, ensure_ascii=False))
        table.add_row(
            _plain(format_key((step.name, step.occurrence))),
            _clock(step.heartbeat_at),
            _plain(details if len(details) < 80 else details[:77] + "..."),
        )
    console.print(table)


def _printable(text: str) -> str:
    """``text`` with each character that is not printable shown as its escape, as ``repr`` shows it.

    Line breaks, tabs, terminal escapes and the like become ``\\n``, ``\\t``, ``\\x1b``...,
    so a value keeps to one line of output. (What ``str.isprintable`` calls printable stays.)
    """
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else ascii(char)[1:-1] for char in text)


def _plain(value: object, style: str = "") -> Text:
    """A value a workflow (or anyone) wrote, as rich text that is never read as markup.

    rich reads ``[red]`` in a plain string as a style and ``:x:`` as an emoji; a ``Text``
    is shown as it is. With ``_printable`` nothing in it can break a table row either.
    """
    return Text(_printable(str(value)), style=style)


def _headline(info: InstanceInfo) -> Text:
    """``<id>  <workflow>  <status>``, the first line of ``status`` and ``history``."""
    return Text.assemble(
        _plain(info.id, "bold"), "  ", _plain(info.workflow), "  ", _plain(_status_text(info), "bold")
    )


def _status_text(info: InstanceInfo, *, brief: bool = False) -> str:
    """The status as an operator reads it: a held or rolling-back instance says so (a plain pause not)."""
    if info.rolling_back:
        why = "" if brief else ": its compensations run"
        return f"{info.status} (rolling back{why})"
    if not info.is_held:
        return info.status
    if brief:
        return f"{info.status} (held)"
    return f"{info.status} (held: its replay diverged from the history; resume after a fix)"


def _clock(value: datetime | None) -> str:
    return "-" if value is None else f"{value:%H:%M:%S.%f}"[:-3]


def _utc(value: datetime | None) -> datetime | None:
    """Command-line times are UTC unless they say otherwise."""
    if value is None:
        return None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _time(value: Any) -> str:
    return "-" if value is None else f"{value:%Y-%m-%d %H:%M:%S}"
