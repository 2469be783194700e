"""``stepline pause|resume|terminate|restart``: one instance by ID, or every instance a filter picks."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

import click
from rich.console import Console
from rich.progress import MofNCompleteColumn, Progress

from stepline.producer.bulk import BulkAction, BulkOutcome
from stepline.producer.cli import (
    JSON_OPTION,
    _checked,
    _print_json,
    _settings,
    _utc,
    _with_client,
)
from stepline.shared.messages import check_instance_id
from stepline.shared.states import InstanceStatus

OPTIONAL_ID = click.argument("instance_id", required=False, callback=_checked(check_instance_id))


def _filters(command: Callable[..., Any]) -> Callable[..., Any]:
    """The filters of the bulk form, and its batch size and dry run."""
    options = [
        click.option("--workflow", default=None, help="Bulk: instances of this workflow (exact name)."),
        click.option(
            "--status",
            "status_",
            type=click.Choice([s.value for s in InstanceStatus]),
            default=None,
            help="Bulk: instances in this status (re-checked under each instance's lock).",
        ),
        click.option("--since", type=click.DateTime(), default=None, help="Bulk: created at or after (UTC)."),
        click.option("--build", "build_id", metavar="ID", default=None, help="Bulk: started by this build."),
        click.option(
            "--held", is_flag=True, help="Bulk: held instances only (paused because their replay diverged)."
        ),
        click.option(
            "--dry-run", is_flag=True, help="Bulk: print how many match and the first ids; change none."
        ),
        click.option(
            "--batch-size",
            type=click.IntRange(1, 10000),
            default=500,
            show_default=True,
            help="Bulk: instances per transaction.",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _terminate_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """``terminate --rollback --children``: what else a terminate does."""
    command = click.option(
        "--children",
        is_flag=True,
        help="Also terminate the children started with ctx.start_child (detached ones).",
    )(command)
    return click.option(
        "--rollback",
        is_flag=True,
        help="First run the compensations of its committed steps, newest first; it ends terminated after.",
    )(command)


def _no_options(command: Callable[..., Any]) -> Callable[..., Any]:
    return command


def _control_command(name: BulkAction, summary: str) -> click.Command:
    """Register ``stepline NAME ID`` and its bulk form ``stepline NAME --workflow W --status S ...``."""
    extra = _terminate_options if name == "terminate" else _no_options

    @click.command(name=name, help=summary + _BULK_HELP)
    @OPTIONAL_ID
    @_filters
    @extra
    @JSON_OPTION
    def command(
        instance_id: str | None,
        workflow: str | None,
        status_: str | None,
        since: datetime | None,
        build_id: str | None,
        held: bool,
        dry_run: bool,
        batch_size: int,
        as_json: bool,
        **options: bool,
    ) -> None:
        if instance_id is not None:
            _refuse_filters_with_an_id(workflow, status_, since, build_id, held, dry_run)
            _control(name, instance_id, as_json, options)
            return
        if workflow is None:
            raise click.UsageError(
                f"give an instance ID, or --workflow NAME to {name} many "
                "(with --status, --since, --build, --held to narrow them)"
            )
        if name == "resume" and held and (status_, since, build_id) == (None, None, None):
            _resume_held(workflow, dry_run, as_json)  # `resume --held --workflow W`, as it was before
            return
        _bulk(name, workflow, status_, _utc(since), build_id, held, dry_run, batch_size, as_json, options)

    return command


def _refuse_filters_with_an_id(*values: object) -> None:
    if any(value not in (None, False) for value in values):
        raise click.UsageError("give an instance ID, or --workflow NAME and filters, not both")


_BULK_HELP = """

    With no ID, acts on every instance of --workflow that fits all the other
    filters given (--status, --since, --build, --held), --batch-size per
    transaction, and prints how many matched, changed and were skipped (and
    why). Each instance gets the same rule as the one-ID form. --dry-run prints
    how many match and the first ids, and changes nothing.
"""


def _control(name: str, instance_id: str, as_json: bool, options: dict[str, bool]) -> None:
    """Run one control action on one instance and print its new status."""
    publishes = name != "pause"
    settings = _settings("database_url", "amqp_url") if publishes else _settings("database_url")
    info = _with_client(
        settings, lambda client: getattr(client, name)(instance_id, **options), publishes=publishes
    )
    if as_json:
        _print_json(info.model_dump(mode="json", exclude={"steps"}))
    else:
        rolling_back = " (rolling back)" if info.rolling_back else ""
        click.echo(f"{info.id}: {info.status}{rolling_back}")


def _bulk(
    name: BulkAction,
    workflow: str | None,
    status: str | None,
    since: datetime | None,
    build_id: str | None,
    held: bool,
    dry_run: bool,
    batch_size: int,
    as_json: bool,
    options: dict[str, bool],
) -> None:
    publishes = name != "pause" and not dry_run
    settings = _settings("database_url", "amqp_url") if publishes else _settings("database_url")
    with Progress(
        *Progress.get_default_columns(),
        MofNCompleteColumn(),
        console=Console(stderr=True),
        disable=as_json or dry_run,
    ) as progress:
        task = progress.add_task(f"{name}", total=None)

        def report(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        outcome = _with_client(
            settings,
            lambda client: client.bulk(
                name,
                workflow=workflow,
                status=status,
                created_after=since,
                build_id=build_id,
                held=held,
                batch_size=batch_size,
                dry_run=dry_run,
                progress=report,
                **options,
            ),
            publishes=publishes,
        )
    _print_outcome(outcome, as_json)


def _print_outcome(outcome: BulkOutcome, as_json: bool) -> None:
    if as_json:
        _print_json(outcome.model_dump(mode="json"))
        return
    if outcome.dry_run:
        for instance_id in outcome.sample:
            click.echo(instance_id)
        more = f" (first {len(outcome.sample)} shown)" if outcome.matched > len(outcome.sample) else ""
        click.echo(f"{outcome.matched} instances match{more}; dry run: none changed")
        return
    skipped = sum(outcome.skipped.values())
    click.echo(f"{outcome.action}: {outcome.matched} matched, {outcome.changed} changed, {skipped} skipped")
    for reason, count in sorted(outcome.skipped.items()):
        click.echo(f"  skipped {count}: {reason}")


def _resume_held(workflow: str, dry_run: bool, as_json: bool) -> None:
    """``resume --held --workflow W``: every held instance of a workflow, as before the bulk form."""
    if dry_run:
        infos = _with_client(_settings("database_url"), lambda client: client.held(workflow))
        if as_json:
            _print_json([info.model_dump(mode="json", exclude={"steps"}) for info in infos])
            return
        for info in infos:
            click.echo(f"{info.id}: {(info.error or {}).get('message')}")
        click.echo(f"{len(infos)} held instances of {workflow} (dry run: none resumed)")
        return
    with Progress(
        *Progress.get_default_columns(), MofNCompleteColumn(), console=Console(stderr=True), disable=as_json
    ) as progress:
        task = progress.add_task("resuming", total=None)

        def report(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        resumed = _with_client(
            _settings("database_url", "amqp_url"),
            lambda client: client.resume_held(workflow, progress=report),
            publishes=True,
        )
    if as_json:
        _print_json({"workflow": workflow, "resumed": resumed})
    else:
        click.echo(f"resumed {resumed} held instances of {workflow}")


pause = _control_command("pause", "Pause an instance: no new step starts; a running step still commits.")
resume = _control_command(
    "resume",
    "Resume a paused instance. A held one (paused because its replay diverged; its error\n"
    "names both sides) goes on from its history on the code deployed now, or is held again.\n"
    "`resume --held --workflow W` resumes every held instance of W.",
)
terminate = _control_command(
    "terminate",
    "Terminate an instance and its children; nothing runs again.\n"
    "--rollback first runs its compensations (newest step first); --children also\n"
    "terminates the children it started detached (ctx.start_child).",
)
restart = _control_command("restart", "Clear an instance's history and run it again from the start, same id.")
