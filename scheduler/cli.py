"""``stepline-scheduler``: fire sleeps, retry back-offs and schedules when they fall due."""

from __future__ import annotations

import click

from stepline.scheduler.runner import run_scheduler
from stepline.shared.errors import ConfigError
from stepline.shared.logs import configure_logging
from stepline.shared.process import fail, run_until_signalled
from stepline.shared.settings import load_settings
from stepline.shared.telemetry import configure_telemetry, shutdown_telemetry


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--poll-interval",
    default=None,
    help="Longest wait between timer scans, e.g. 500ms. Env: STEPLINE_SCHEDULER__POLL_INTERVAL.",
)
def main(poll_interval: str | None) -> None:
    """Fire durable timers (sleeps, retry back-offs) and schedules from PostgreSQL into RabbitMQ.

    Several schedulers may run at once. Needs STEPLINE_DATABASE_URL and
    STEPLINE_AMQP_URL. Stops cleanly on SIGTERM.

    Exit status: 0 after a clean stop; 2 for a missing or malformed setting;
    3 if PostgreSQL or RabbitMQ did not answer within STEPLINE_STARTUP_TIMEOUT
    (default 60s) at start-up; 1 for any other error. Each failure is one line
    on stderr.
    """
    try:
        configure_logging("scheduler")
        settings = (
            load_settings(scheduler={"poll_interval": poll_interval}) if poll_interval else load_settings()
        )
    except ConfigError as exc:
        fail("stepline-scheduler", str(exc))
    hooks = configure_telemetry("scheduler")
    try:
        run_until_signalled(
            "stepline-scheduler", lambda stopping: run_scheduler(settings, stopping, hooks=hooks)
        )
    finally:
        shutdown_telemetry()
