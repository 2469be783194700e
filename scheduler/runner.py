"""The scheduler process: fire due timers and schedules until told to stop; sweep the outbox too."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from sqlalchemy.exc import SQLAlchemyError

from stepline.scheduler.limits import LimitSweeper
from stepline.scheduler.publisher import BackgroundPublisher
from stepline.scheduler.reconciler import reconcile_until_stopped
from stepline.scheduler.schedules import fire_due_schedules, seconds_until_next_schedule
from stepline.scheduler.timers import fire_due_timers
from stepline.shared.broker import create_broker
from stepline.shared.db.store import Store
from stepline.shared.db.stores import create_store_for
from stepline.shared.diagnosis import Limits
from stepline.shared.health import HealthServer
from stepline.shared.hooks import Hooks
from stepline.shared.outbox import OutboxRelay
from stepline.shared.repair import broker_queue_depth
from stepline.shared.retrying import Outage, StopRequested, first_line
from stepline.shared.settings import SCHEDULER_CONNECTIONS, SchedulerSettings, Settings
from stepline.shared.startup import check_database, connect_broker

log = logging.getLogger("stepline.scheduler")

LOCKED_RETRY_S = 0.05
"""How soon to look again when the due schedules were all held by another scheduler."""


async def fire_timers_until_stopped(
    store: Store,
    publisher: BackgroundPublisher,
    settings: SchedulerSettings,
    stopping: asyncio.Event,
    *,
    hooks: Hooks | None = None,
    limits: LimitSweeper | None = None,
) -> None:
    """Fire due timers at the database's pace and hand them to ``publisher``.

    A full batch means more are due: claim again at once. Otherwise sleep until
    the next timer is due, at most ``poll_interval`` (another process may arm
    an earlier one meanwhile). ``limits`` sweeps step limits when their next
    lease lapses or token falls due (one statement finds both times).
    """
    poll = settings.poll_interval.total_seconds()
    # The loop scans every poll interval, outage or not: the first scan that works ends it.
    outage = Outage("scanning timers", log)
    while not stopping.is_set():
        wait = poll
        try:
            fired = await fire_due_timers(store, batch_size=settings.batch_size, hooks=hooks)
            outage.recovered()
            more_due = len(fired) == settings.batch_size
            publisher.backlog(more_due)
            if fired:
                log.info("fired %d timers", len(fired), extra={"event": "timers_fired"})
                await publisher.put(fired)
            if limits is not None:
                await limits.sweep_if_due()
            if more_due:
                continue  # no pause
            next_due, limits_due = await store.seconds_until_next_due()
            if limits is not None:
                limits.due_in(limits_due)
                next_due = _earliest(next_due, limits_due)
            if next_due is not None:
                wait = max(0.0, min(poll, next_due))
        except (SQLAlchemyError, OSError) as exc:
            publisher.backlog(False)
            outage.failed(first_line(exc))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopping.wait(), timeout=wait)


async def fire_schedules_until_stopped(
    store: Store,
    relay: OutboxRelay,
    settings: SchedulerSettings,
    stopping: asyncio.Event,
    *,
    payload_limit: int,
) -> None:
    """Start schedules' instances as their ticks fall due, until ``stopping`` is set.

    Each look is one indexed query (the earliest ``due_at``); the loop sleeps
    until then, at most ``poll_interval``, which is how soon a schedule created
    or changed by another process is seen (there is no wake-up signal). The
    starts are published at once; those a failure leaves in the outbox go out
    with the sweeper.
    """
    poll = settings.poll_interval.total_seconds()
    outage = Outage("firing schedules", log)
    while not stopping.is_set():
        wait = poll
        try:
            due_in = await seconds_until_next_schedule(store)
            if due_in is not None and due_in <= 0:
                fired = await fire_due_schedules(store, payload_limit=payload_limit)
                outage.recovered()
                await relay.publish_committed(fired.rows)
                if fired.claimed:
                    continue  # more may be due: look again at once
                wait = min(poll, LOCKED_RETRY_S)  # another scheduler holds them: its commit moves them on
            else:
                outage.recovered()
                if due_in is not None:
                    wait = min(poll, due_in)
        except (SQLAlchemyError, OSError) as exc:
            outage.failed(first_line(exc))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopping.wait(), timeout=wait)


def _earliest(first: float | None, second: float | None) -> float | None:
    return min((value for value in (first, second) if value is not None), default=None)


async def run_scheduler(
    settings: Settings,
    stopping: asyncio.Event,
    *,
    startup_timeout_s: float | None = None,
    hooks: Hooks | None = None,
) -> None:
    """Fire timers as they fall due until ``stopping`` is set.

    Raises:
        ServiceUnavailableError: PostgreSQL or RabbitMQ did not answer within
            ``startup_timeout_s`` (default: the ``startup_timeout`` setting).
    """
    if startup_timeout_s is None:
        startup_timeout_s = settings.startup_timeout.total_seconds()
    store = create_store_for(
        settings.database,
        settings.db,
        "stepline-scheduler",
        connections=SCHEDULER_CONNECTIONS,
        pre_ping=False,
        held=1,
    )
    broker = create_broker(settings.amqp, settings.namespace, settings.broker)
    try:
        await connect_broker(broker, settings.amqp, deadline_s=startup_timeout_s, stopping=stopping)
        await check_database(store, settings.database, deadline_s=startup_timeout_s, stopping=stopping)
        relay = OutboxRelay(store, broker, settings.outbox, hooks=hooks)
        health = None
        if settings.health_port is not None:
            health = HealthServer(
                settings.health_port,
                {"database": store.answers, "broker": broker.is_connected},
            )
            await health.start()
        sweeper = asyncio.create_task(relay.run_sweeper(stopping))
        # Rows older than most of the sweeper's grace are left to it, not published twice.
        publisher = BackgroundPublisher(
            relay, stale_after_s=0.8 * settings.outbox.sweep_after.total_seconds()
        )
        publisher.start()
        outage_watch = asyncio.create_task(publisher.watch_outage(stopping))
        schedules = asyncio.create_task(
            fire_schedules_until_stopped(
                store, relay, settings.scheduler, stopping, payload_limit=settings.max_payload_bytes
            ),
            name="stepline-schedules",
        )
        background = {schedules}
        interval = settings.scheduler.reconcile_interval.total_seconds()
        if interval > 0:
            limits = Limits(settings.scheduler.reconcile_grace, settings.worker.default_step_timeout)
            background.add(
                asyncio.create_task(
                    reconcile_until_stopped(
                        store,
                        relay,
                        limits,
                        interval,
                        stopping,
                        payload_limit=settings.max_payload_bytes,
                        hooks=hooks,
                        queue_depth=broker_queue_depth(broker),
                    ),
                    name="stepline-reconciler",
                )
            )
        log.info("scheduler started", extra={"event": "scheduler_started"})
        try:
            sweeper_of_limits = LimitSweeper(store, relay, settings.limits.lease)
            await fire_timers_until_stopped(
                store, publisher, settings.scheduler, stopping, hooks=hooks, limits=sweeper_of_limits
            )
        finally:
            if not stopping.is_set():
                for task in background:
                    task.cancel()  # the timer loop failed: the process is going down
            await asyncio.wait(background)
            await publisher.close()
            outage_watch.cancel()
            await asyncio.wait({outage_watch})
        await sweeper
        if health is not None:
            await health.stop()
    except StopRequested as stopped:
        log.info("stopping before start-up finished: %s", stopped, extra={"event": "scheduler_stopping"})
    finally:
        await broker.close()
        await store.close()
        log.info("scheduler stopped", extra={"event": "scheduler_stopped"})
