"""``stepline debug ID``: replay one recorded instance in this process, to step through in a debugger.

Kept light at import: the engine, the store and the workflow modules load when
the command runs, so ``stepline --help`` does not pay for them.
"""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING

import click

from stepline.worker.cli_options import workflow_modules_option

if TYPE_CHECKING:
    from stepline.worker.debugger import DebugReport


@click.command(name="debug")
@click.argument("instance_id", metavar="ID")
@workflow_modules_option("Module defining the workflow, as the code to debug (repeatable).")
@click.option(
    "--pdb", "stop_at_start", is_flag=True, help="Stop in pdb at the workflow function's first line."
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def debug(instance_id: str, modules: tuple[str, ...], stop_at_start: bool, as_json: bool) -> None:
    """Replay instance ID's recorded history against MODULE's code, here: no step runs, nothing is written.

    Step results come from the history, so the workflow function takes the
    branches it took. Put breakpoint() in it (PYTHONBREAKPOINT picks the
    debugger), or pass --pdb to stop at its first line. Prints what the code
    asked for and how it ended; exits 1 where the code and the history part
    ways (naming both), 2 if the instance or its workflow cannot be found.
    Needs STEPLINE_DATABASE_URL.
    """
    import asyncio

    from stepline.shared.codec import payloads_from_settings
    from stepline.shared.db import stores
    from stepline.shared.errors import ConfigError, InstanceNotFoundError, SteplineError
    from stepline.shared.settings import CLIENT_CONNECTIONS, load_settings
    from stepline.worker.debugger import Recorded, debug_replay, load_recorded
    from stepline.worker.registry import load_workflows

    try:
        settings = load_settings(require=("database_url",))
        if "" not in sys.path:
            sys.path.insert(0, "")  # modules are named relative to the working directory, as for the worker
        workflows = load_workflows(modules)
        payloads = payloads_from_settings(settings)  # the codec's keys open what the replay reads
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None

    async def read() -> Recorded:
        store = stores.create_store_for(
            settings.database, settings.db, "stepline-debug", connections=CLIENT_CONNECTIONS
        )
        try:
            return await load_recorded(store, instance_id)
        finally:
            await store.close()  # closed before any workflow code runs: the replay cannot write

    try:
        recorded = asyncio.run(read())
    except InstanceNotFoundError as exc:
        raise click.UsageError(str(exc)) from None
    except SteplineError as exc:
        raise click.ClickException(str(exc)) from None
    workflow = workflows.get(recorded.history.workflow)
    if workflow is None:
        raise click.UsageError(
            f"instance {instance_id!r} is of workflow {recorded.history.workflow!r}, "
            f"which {', '.join(modules)} does not define"
        )
    report = debug_replay(workflow, recorded, stop_at_start=stop_at_start, payloads=payloads)
    if as_json:
        click.echo(json.dumps(_as_json(report), indent=2, default=str))
    else:
        _print(report, modules)
    sys.exit(1 if report.is_diverged else 0)


def _as_json(report: DebugReport) -> dict[str, object]:
    from dataclasses import asdict

    return {**asdict(report), "diverged": report.is_diverged}


def _print(report: DebugReport, modules: tuple[str, ...]) -> None:
    from stepline.worker.replay_check import _escaped

    def say(text: str) -> None:
        click.echo(_escaped(text))

    say(
        f"{report.instance_id} ({report.workflow}, {report.status}) replayed against "
        f"{', '.join(modules)}: no step ran, nothing was written"
    )
    for number, entry in enumerate(report.replayed, start=1):
        if entry.status is None:
            shown = "not in the history (the instance had not got here; debug runs no step)"
        elif entry.error is not None:
            shown = f"{entry.status}: {entry.error}"
        else:
            shown = f"{entry.status}: {json.dumps(entry.result, default=str)}"
        say(f"  {number}. {entry.what}: {shown}")
    say(_ending(report))


def _ending(report: DebugReport) -> str:
    """The last line: how the replay ended, and whether it ended as the instance did."""
    same = {True: " (as recorded)", False: " (NOT as recorded)", None: ""}[report.matches_record]
    if report.outcome == "diverged":
        return (
            f"the code and the history part ways: the history holds {report.expected}, "
            f"but the code asked for {report.found}"
        )
    if report.outcome == "returned":
        return f"the workflow returned {json.dumps(report.output, default=str)}{same}"
    if report.outcome == "raised":
        return f"the workflow raised {report.error}{same}"
    if report.outcome == "quit":
        return "the debugger quit: the replay stopped there"
    waiting = [entry.what for entry in report.replayed if entry.status not in ("succeeded", "failed")]
    return f"the history ends here: the workflow waits on {', '.join(waiting) or 'nothing recorded'}"
