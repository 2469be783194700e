"""``stepline-worker``: import the named workflow modules and run their steps."""

from __future__ import annotations

import sys
from typing import Any

import click

from stepline.shared.codec import payloads_from_settings
from stepline.shared.errors import ConfigError
from stepline.shared.logs import configure_logging
from stepline.shared.process import fail, run_until_signalled, this_process
from stepline.shared.settings import load_settings
from stepline.shared.telemetry import configure_telemetry, shutdown_telemetry
from stepline.shared.topology import check_pool_name
from stepline.worker.registry import load_workflows
from stepline.worker.runner import run_worker


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--workflows",
    "modules",
    multiple=True,
    metavar="MODULE",
    help="Module defining workflows (repeatable). Env: STEPLINE_WORKER__WORKFLOWS (comma-separated).",
)
@click.option(
    "--concurrency",
    type=click.IntRange(1, 1024),
    default=None,
    help="Steps run at once. Env: STEPLINE_WORKER__CONCURRENCY (default 16).",
)
@click.option(
    "--pool",
    "pools",
    multiple=True,
    metavar="NAME",
    help="Run the steps of this worker pool (repeatable; 'default' is the pool of steps that name none). "
    "Without it: the default pool. Env: STEPLINE_WORKER__POOLS (comma-separated).",
)
@click.option("--worker-id", default=None, help="Name recorded on step attempts (default host:pid).")
def main(
    modules: tuple[str, ...], concurrency: int | None, pools: tuple[str, ...], worker_id: str | None
) -> None:
    """Run workflow steps from RabbitMQ, committing to PostgreSQL.

    Needs STEPLINE_DATABASE_URL and STEPLINE_AMQP_URL. Stops cleanly on SIGTERM.

    A worker with --pool runs only those pools' steps: starts, wakes, events and
    resumes are taken by workers of the default pool, so a fleet needs some.

    Exit status: 0 after a clean stop; 2 for a missing or malformed setting or option;
    3 if PostgreSQL or RabbitMQ did not answer within STEPLINE_STARTUP_TIMEOUT
    (default 60s) at start-up; 1 for any other error. Each failure is one line
    on stderr.
    """
    worker_overrides: dict[str, Any] = {}
    if modules:
        worker_overrides["workflows"] = list(modules)
    if concurrency is not None:
        worker_overrides["concurrency"] = concurrency
    for pool in pools:
        try:
            check_pool_name(pool)
        except ValueError as exc:
            fail("stepline-worker", f"--pool: {exc}")
    if pools:
        worker_overrides["pools"] = list(pools)
    try:
        configure_logging("worker")
        settings = load_settings(worker=worker_overrides) if worker_overrides else load_settings()
        if "" not in sys.path:
            sys.path.insert(0, "")  # modules are named relative to the working directory
        workflows = load_workflows(settings.worker.workflows)
        payloads_from_settings(settings)  # a codec that does not load: one line, exit 2
    except ConfigError as exc:
        fail("stepline-worker", str(exc))
    identity = worker_id or this_process()
    hooks = configure_telemetry("worker", worker_id=identity)
    try:
        run_until_signalled(
            "stepline-worker",
            lambda stopping: run_worker(settings, workflows, stopping, worker_id=identity, hooks=hooks),
        )
    finally:
        shutdown_telemetry()
