"""The deploy gate: replay every unfinished instance against new code, writing nothing.

``check_instances`` streams the histories of unfinished instances (running,
waiting, paused, queued) a page at a time and replays each against the given
workflows, as a worker would after the deploy, but without running a step or
writing a row. ``replay_check`` is the ``stepline replay-check`` command built
on it; ``stepline.cli`` adds it to the ``stepline`` group (it lives here because
the producer may not import the worker).
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import click
from rich.console import Console
from rich.progress import MofNCompleteColumn, Progress

from stepline.shared.codec import Payloads, payloads_from_settings
from stepline.shared.db import stores
from stepline.shared.db.store import Store
from stepline.shared.errors import ConfigError, NonDeterminismError, SteplineError
from stepline.shared.settings import CLIENT_CONNECTIONS, load_settings
from stepline.worker.cli_options import workflow_modules_option
from stepline.worker.registry import load_workflows
from stepline.worker.replay.engine import Replay
from stepline.worker.workflow import Workflow

__all__ = ["Divergence", "ReplayReport", "check_instances", "replay_check"]


@dataclass(frozen=True, slots=True)
class Divergence:
    """An instance whose history the code would not replay: the held reason a worker would give."""

    id: str
    workflow: str
    error: str
    """The whole message, as the held instance's error would read."""
    expected: str
    """What the history holds at the first difference."""
    found: str
    """What the code asked for there."""


@dataclass(slots=True)
class ReplayReport:
    """What a check found."""

    checked: int = 0
    workflows: list[str] = field(default_factory=list)
    """The workflows checked: those with unfinished instances that the code defines."""
    missing: list[str] = field(default_factory=list)
    """Workflows with unfinished instances that the code does not define (not checked)."""
    diverged: list[Divergence] = field(default_factory=list)


async def check_instances(
    store: Store,
    workflows: Mapping[str, Workflow[Any, Any]],
    *,
    workflow: str | None = None,
    limit: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    page_size: int = 500,
    payloads: Payloads | None = None,
) -> ReplayReport:
    """Replay the unfinished instances of ``workflows`` against their code; nothing is run or written.

    Args:
        store: The database to read.
        workflows: The code to check, by workflow name (``load_workflows``).
        workflow: Check only this workflow's instances.
        limit: Check at most this many instances.
        progress: Called with (checked, total) after each page.
        page_size: Histories read per round trip; memory holds one page.
        payloads: The codec that opens encrypted params and results (``STEPLINE_CODEC``).
    """
    counts = await store.unfinished_workflows()
    if workflow is not None:
        counts = {name: count for name, count in counts.items() if name == workflow}
    report = ReplayReport(
        workflows=sorted(name for name in counts if name in workflows),
        missing=sorted(name for name in counts if name not in workflows),
    )
    total = sum(counts[name] for name in report.workflows)
    if limit is not None:
        total = min(total, limit)
    if not report.workflows:
        return report
    async for page in store.unfinished_histories(report.workflows, page_size=page_size, limit=limit):
        for history in page:
            # A replay drives the workflow on a private loop: no step runs, nothing is written.
            with Replay(workflows[history.workflow], history, payloads=payloads) as replay:
                outcome = replay.start()
            if outcome.kind == "diverged":
                assert isinstance(outcome.error, NonDeterminismError)
                report.diverged.append(
                    Divergence(
                        history.instance_id,
                        history.workflow,
                        str(outcome.error),
                        outcome.error.expected,
                        outcome.error.found,
                    )
                )
        report.checked += len(page)
        if progress is not None:
            progress(report.checked, total)
        await asyncio.sleep(0)  # a page of replays is CPU work: let the loop breathe between pages
    return report


def _escaped(text: str) -> str:
    """Control characters shown as escapes: a stored name cannot move the cursor or forge a line."""
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode() for ch in text)


def _divergence_line(item: Divergence) -> str:
    return _escaped(
        f"{item.id} ({item.workflow}): the history holds {item.expected}, but the code asked for {item.found}"
    )


@click.command(name="replay-check")
@workflow_modules_option("Module defining the workflows to deploy (repeatable).")
@click.option("--workflow", default=None, help="Check only this workflow's instances.")
@click.option("--limit", type=click.IntRange(1), default=None, help="Check at most N instances.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def replay_check(modules: tuple[str, ...], workflow: str | None, limit: int | None, as_json: bool) -> None:
    """Replay every unfinished instance against MODULE's code before a deploy; write nothing.

    Prints each instance that would diverge (a worker would hold it) and exits 1
    if any would, 0 if none; 2 if MODULE defines none of the database's workflows.
    """
    try:
        settings = load_settings(require=("database_url",))
        workflows = load_workflows(modules)
        payloads = payloads_from_settings(settings)
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None
    if workflow is not None and workflow not in workflows:
        raise click.UsageError(f"workflow {workflow!r} is not defined in {', '.join(modules)}")

    with Progress(
        *Progress.get_default_columns(), MofNCompleteColumn(), console=Console(stderr=True), disable=as_json
    ) as bar:
        task = bar.add_task("replaying", total=None)

        def report_progress(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        async def body() -> ReplayReport:
            store = stores.create_store_for(
                settings.database, settings.db, "stepline-replay-check", connections=CLIENT_CONNECTIONS
            )
            try:
                return await check_instances(
                    store,
                    workflows,
                    workflow=workflow,
                    limit=limit,
                    progress=report_progress,
                    payloads=payloads,
                )
            finally:
                await store.close()

        try:
            report = asyncio.run(body())
        except SteplineError as exc:
            raise click.ClickException(str(exc)) from None
    sys.exit(_print_report(report, as_json))


def _print_report(report: ReplayReport, as_json: bool) -> int:
    """Print the report; the exit code it calls for."""
    if not report.workflows and report.missing:
        click.echo(
            _escaped(
                "the code defines none of the workflows with unfinished instances: "
                + ", ".join(report.missing)
            ),
            err=True,
        )
        return 2
    if as_json:
        data = {
            "checked": report.checked,
            "workflows": report.workflows,
            "not_defined": report.missing,
            "diverged": [{"id": d.id, "workflow": d.workflow, "error": d.error} for d in report.diverged],
        }
        click.echo(json.dumps(data, indent=2))
    elif not report.workflows:
        click.echo("no unfinished instances: nothing to check")
    else:
        for item in report.diverged:
            click.echo(_divergence_line(item))
        if report.missing:
            click.echo(_escaped("not checked (not defined in the code): " + ", ".join(report.missing)))
        noun = "workflow" if len(report.workflows) == 1 else "workflows"
        click.echo(
            f"checked {report.checked:,} instances of {len(report.workflows)} {noun}: "
            f"{len(report.diverged):,} would diverge"
        )
    return 1 if report.diverged else 0
