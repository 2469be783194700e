"""``stepline schedule create|list|pause|resume|delete|trigger``: schedules from the command line."""

from __future__ import annotations

import json
from typing import Any, get_args

import click
from rich.table import Table

from stepline.producer.cli import JSON_OPTION, _console, _plain, _settings, _time, _with_client
from stepline.producer.models import ScheduleInfo
from stepline.shared.schedules import CatchUp, InvalidScheduleError, Overlap, Schedule

SCHEDULE_ID = click.argument("schedule_id")


@click.group()
def schedule() -> None:
    """Start workflows on a clock: create, list, pause, resume, delete and trigger schedules.

    A schedule declared in code (``@workflow(name, schedules=[...])``) is written
    by the workers when they start; these commands also manage it, except that
    ``create`` refuses its id.
    """


@schedule.command()
@SCHEDULE_ID
@click.argument("workflow")
@click.option(
    "--cron",
    required=True,
    help='Five fields (minute hour day month weekday), or six with seconds first: "*/10 * * * * *".',
)
@click.option("--params", default="null", help="The params of each start, as JSON.")
@click.option("--timezone", default="UTC", show_default=True, help="IANA time zone the cron reads in.")
@click.option("--overlap", type=click.Choice(get_args(Overlap)), default="skip", show_default=True)
@click.option(
    "--catch-up", "catch_up", type=click.Choice(get_args(CatchUp)), default="latest", show_default=True
)
@click.option(
    "--allow-unregistered",
    is_flag=True,
    help="Create it even if no worker serving WORKFLOW has run yet.",
)
@JSON_OPTION
def create(
    schedule_id: str,
    workflow: str,
    cron: str,
    params: str,
    timezone: str,
    overlap: Overlap,
    catch_up: CatchUp,
    allow_unregistered: bool,
    as_json: bool,
) -> None:
    """Create (or replace) the run-time schedule SCHEDULE_ID, starting WORKFLOW at each tick.

    Each tick starts the instance <SCHEDULE_ID>@<tick, ISO 8601 UTC>. Needs
    STEPLINE_AMQP_URL too: WORKFLOW must be registered, as for `stepline start`.
    """
    try:
        parsed = json.loads(params)
    except ValueError as exc:
        raise click.BadParameter(f"not JSON: {exc}", param_hint="--params") from None
    try:
        definition = Schedule(cron, parsed, timezone, overlap, catch_up)
    except InvalidScheduleError as exc:
        raise click.ClickException(
            f"schedule {schedule_id!r} of workflow {workflow!r}: {exc.field} {exc.value!r} {exc.reason}"
        ) from None
    info = _with_client(
        _settings("database_url", "amqp_url"),
        lambda client: client.create_schedule(
            schedule_id, workflow, definition, allow_unregistered=allow_unregistered
        ),
        publishes=True,
    )
    _show_one(info, as_json)


@schedule.command(name="list")
@click.option("--workflow", default=None, help="Only the schedules of this workflow.")
@JSON_OPTION
def list_(workflow: str | None, as_json: bool) -> None:
    """List schedules with their next five fire times (UTC)."""
    infos = _with_client(_settings("database_url"), lambda client: client.list_schedules(workflow=workflow))
    if as_json:
        click.echo(json.dumps([info.model_dump(mode="json") for info in infos], indent=2))
        return
    table = Table(
        "id", "workflow", "cron", "zone", "overlap", "catch-up", "from", "state", "next fire times (UTC)"
    )
    for info in infos:
        table.add_row(
            _plain(info.id),
            _plain(info.workflow),
            _plain(info.cron),
            _plain(info.timezone),
            info.overlap,
            info.catch_up,
            info.source,
            "paused" if info.paused else "active",
            "\n".join(_time(moment) for moment in info.next_fire_times) or "-",
        )
    _console().print(table)


def _action(name: str, summary: str, *, publishes: bool = False) -> None:
    """Register ``stepline schedule NAME SCHEDULE_ID``."""

    @schedule.command(name=name, help=summary)
    @SCHEDULE_ID
    @JSON_OPTION
    def command(schedule_id: str, as_json: bool) -> None:
        settings = _settings("database_url", "amqp_url") if publishes else _settings("database_url")
        result: Any = _with_client(
            settings, lambda client: getattr(client, f"{name}_schedule")(schedule_id), publishes=publishes
        )
        if isinstance(result, ScheduleInfo):
            _show_one(result, as_json)
        elif name == "trigger":
            click.echo(json.dumps({"instance_id": result, "schedule": schedule_id}) if as_json else result)
        else:
            click.echo(json.dumps({"deleted": schedule_id}) if as_json else f"{schedule_id}: deleted")


_action("pause", "Stop firing SCHEDULE_ID until it is resumed (running instances go on).")
_action("resume", "Fire SCHEDULE_ID again from its next tick; ticks missed while paused are not started.")
_action("delete", "Delete SCHEDULE_ID (a schedule declared in code comes back when a worker starts).")
_action(
    "trigger",
    "Start one instance of SCHEDULE_ID now; prints its id, <SCHEDULE_ID>@<now, ISO 8601 UTC, ms>.",
    publishes=True,
)


def _show_one(info: ScheduleInfo, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(info.model_dump(mode="json"), indent=2))
        return
    state = "paused" if info.paused else f"next {_time(info.next_fire_times[0])} UTC"
    click.echo(f"{info.id}: {info.workflow} at {info.cron!r} ({info.timezone}), {state}")
