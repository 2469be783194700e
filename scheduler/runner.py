"""The scheduler process: fire due timers until told to stop; sweep the outbox too."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from sqlalchemy.exc import SQLAlchemyError

from scheduler.timers import fire_due_timers, seconds_until_next
from shared.broker import create_broker
from shared.db.engine import create_engine
from shared.db.migrate import check_schema, database_answers
from shared.errors import BrokerError
from shared.health import HealthServer
from shared.hooks import Hooks
from shared.outbox import OutboxRelay
from shared.retrying import retry_until
from shared.settings import Settings

log = logging.getLogger("stepline.scheduler")


async def run_scheduler(
    settings: Settings,
    stopping: asyncio.Event,
    *,
    startup_timeout_s: float = 60.0,
    hooks: Hooks | None = None,
) -> None:
    """Fire timers as they fall due until ``stopping`` is set."""
    engine = create_engine(settings.database, pool_size=3, pre_ping=False)
    broker = create_broker(settings.amqp, settings.namespace, settings.broker)
    poll = settings.scheduler.poll_interval.total_seconds()
    try:
        await retry_until(
            broker.connect, what="RabbitMQ", deadline_s=startup_timeout_s, retry_on=(BrokerError,)
        )
        await retry_until(
            lambda: check_schema(engine),
            what="PostgreSQL",
            deadline_s=startup_timeout_s,
            retry_on=(SQLAlchemyError, OSError),
        )
        relay = OutboxRelay(engine, broker, settings.outbox, hooks=hooks)
        health = None
        if settings.health_port is not None:
            health = HealthServer(
                settings.health_port,
                {"database": lambda: database_answers(engine), "broker": broker.is_connected},
            )
            await health.start()
        sweeper = asyncio.create_task(relay.run_sweeper(stopping))
        log.info("scheduler started", extra={"event": "scheduler_started"})
        failing = False
        while not stopping.is_set():
            wait = poll
            try:
                rows = await fire_due_timers(engine, batch_size=settings.scheduler.batch_size, hooks=hooks)
                if rows:
                    log.info("fired %d timers", len(rows), extra={"event": "timers_fired"})
                    await relay.publish_committed(rows)
                if len(rows) == settings.scheduler.batch_size:
                    continue  # more are due: no pause
                next_due = await seconds_until_next(engine)
                if next_due is not None:
                    wait = max(0.0, min(poll, next_due))
                if failing:
                    log.info("database reachable again", extra={"event": "scheduler_recovered"})
                    failing = False
            except (SQLAlchemyError, OSError) as exc:
                if not failing:
                    log.warning("timer scan failed, retrying: %s", exc, extra={"event": "scheduler_db_error"})
                    failing = True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), timeout=wait)
        await sweeper
        if health is not None:
            await health.stop()
    finally:
        await broker.close()
        await engine.dispose()
        log.info("scheduler stopped", extra={"event": "scheduler_stopped"})
