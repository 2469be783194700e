"""``stepline why ID`` and ``stepline repair ID``: why an instance is not moving; repair a stranded one."""

from __future__ import annotations

import json

import click

from stepline.producer.cli import JSON_OPTION, _settings, _with_client
from stepline.producer.why import why_text
from stepline.shared.diagnosis import Limits, diagnosis_json
from stepline.shared.settings import Settings

INSTANCE_ID = click.argument("instance_id")


def _limits(settings: Settings) -> Limits:
    return Limits(settings.scheduler.reconcile_grace, settings.worker.default_step_timeout)


@click.command()
@INSTANCE_ID
@JSON_OPTION
def why(instance_id: str, as_json: bool) -> None:
    """Say what INSTANCE_ID waits on, since when, what will move it, and whether anything is wrong.

    Reads the database (STEPLINE_DATABASE_URL); with STEPLINE_AMQP_URL set, also
    asks RabbitMQ whether a worker consumes the pools its steps wait for. A step
    counts as lost once STEPLINE_SCHEDULER__RECONCILE_GRACE has passed after its
    timeout (STEPLINE_WORKER__DEFAULT_STEP_TIMEOUT if it names none).
    """
    settings = _settings("database_url")
    publishes = settings.amqp_url is not None or settings.embedded is not None
    diagnosis = _with_client(
        settings, lambda client: client.why(instance_id, limits=_limits(settings)), publishes=publishes
    )
    if as_json:
        click.echo(json.dumps({**diagnosis_json(diagnosis), "paragraph": why_text(diagnosis)}, indent=2))
        return
    click.echo(why_text(diagnosis))


@click.command()
@INSTANCE_ID
@JSON_OPTION
def repair(instance_id: str, as_json: bool) -> None:
    """Re-plan INSTANCE_ID if nothing will move it, as the scheduler's reconciler does; else change nothing.

    Says what it did, or why it did nothing. Publishes, so it needs STEPLINE_AMQP_URL.
    """
    settings = _settings("database_url", "amqp_url")
    outcome = _with_client(
        settings, lambda client: client.repair(instance_id, limits=_limits(settings)), publishes=True
    )
    diagnosis = outcome.diagnosis
    assert diagnosis is not None
    if as_json:
        payload = {"instance_id": instance_id, "repaired": outcome.repaired, "done": outcome.done}
        click.echo(json.dumps({**payload, "diagnosis": diagnosis_json(diagnosis)}, indent=2))
        return
    if outcome.repaired:
        click.echo(f"{instance_id}: repaired: {'; '.join(outcome.done)}")
    elif diagnosis.is_stranded:
        click.echo(
            f"{instance_id}: stranded, but nothing can be re-planned automatically: {diagnosis.headline}"
        )
    else:
        click.echo(f"{instance_id}: nothing to repair: {diagnosis.headline}")
