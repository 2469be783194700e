"""``stepline schema``: print the JSON Schemas of the messages and params, for producers in other languages.

Kept light at import: pydantic, the schemas and the workflow modules load when
the command runs, so ``stepline --help`` does not pay for them.
"""

from __future__ import annotations

import json
import sys

import click


@click.command(name="schema")
@click.option(
    "--workflows",
    "modules",
    multiple=True,
    metavar="MODULE",
    help="Module defining workflows: adds each one's params, output and start schemas (repeatable). "
    "Env: STEPLINE_WORKER__WORKFLOWS (comma-separated).",
)
@click.option("--workflow", "only", default=None, metavar="NAME", help="Only this workflow's schemas.")
def schema(modules: tuple[str, ...], only: str | None) -> None:
    """Print JSON Schema (draft 2020-12) of the start and event envelopes, and of workflows.

    Always: "start" and "event", the envelopes a service in any language
    publishes (schema version 1). With --workflows: "workflows", by name, each
    with "params" (what a start's params must fit), "output" (what the
    instance's output holds) and "start" (the envelope for that workflow, its
    params in place). Needs no database or broker.
    """
    from stepline.shared.errors import ConfigError
    from stepline.shared.settings import load_settings
    from stepline.worker.registry import load_workflows
    from stepline.worker.schemas import schema_document

    try:
        names = list(modules) or list(load_settings(require=()).worker.workflows)
        if "" not in sys.path:
            sys.path.insert(0, "")  # modules are named relative to the working directory, as for the worker
        workflows = load_workflows(names) if names else None
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None
    if only is not None:
        if workflows is None or only not in workflows:
            where = ", ".join(names) if names else "no module (pass --workflows MODULE)"
            raise click.UsageError(f"workflow {only!r} is not defined in {where}")
        workflows = {only: workflows[only]}
    click.echo(json.dumps(schema_document(workflows), indent=2))
