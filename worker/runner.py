"""The worker process: consume, run steps with bounded concurrency, stop gracefully."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import Mapping
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from stepline.shared.broker import Broker, Delivery, create_broker
from stepline.shared.codec import payloads_from_settings
from stepline.shared.db.store import Store
from stepline.shared.db.stores import create_store_for
from stepline.shared.errors import BrokerError
from stepline.shared.health import HealthServer
from stepline.shared.hooks import Hooks
from stepline.shared.outbox import OutboxRelay
from stepline.shared.process import this_process
from stepline.shared.retrying import StopRequested, retry_until
from stepline.shared.settings import WORKER_SPARE_CONNECTIONS, Settings
from stepline.shared.startup import check_database, connect_broker
from stepline.shared.topology import is_start
from stepline.worker.executor import StepExecutor
from stepline.worker.handlers import MessageHandler
from stepline.worker.registry import source_build_id
from stepline.worker.replay.cache import ReplayCache
from stepline.worker.schedules import sync_declared_schedules
from stepline.worker.start_batches import StartBatcher
from stepline.worker.work_slots import WorkSlots
from stepline.worker.workflow import Workflow

log = logging.getLogger("stepline.worker")


async def run_worker(
    settings: Settings,
    workflows: Mapping[str, Workflow[Any, Any]],
    stopping: asyncio.Event,
    *,
    worker_id: str | None = None,
    startup_timeout_s: float | None = None,
    hooks: Hooks | None = None,
) -> None:
    """Consume and run steps until ``stopping`` is set, then drain within the grace period.

    Raises:
        ServiceUnavailableError: PostgreSQL or RabbitMQ did not answer within
            ``startup_timeout_s`` (default: the ``startup_timeout`` setting).
    """
    worker_id = worker_id or this_process()  # recorded on every step attempt this process runs
    payloads = payloads_from_settings(settings)  # a codec that does not load stops the worker here
    build_id = settings.worker.build_id or source_build_id(workflows, settings.worker.workflows)
    if startup_timeout_s is None:
        startup_timeout_s = settings.startup_timeout.total_seconds()
    concurrency = settings.worker.concurrency
    # A held connection per concurrent step, for its statements (see stepline.shared.db.held),
    # all within the process's connection budget.
    budget = settings.db.budget(concurrency + WORKER_SPARE_CONNECTIONS)
    if budget < concurrency + WORKER_SPARE_CONNECTIONS:
        log.warning(
            "STEPLINE_DATABASE__MAX_CONNECTIONS=%d is below the worker's concurrency + %d (%d): "
            "steps will wait for database connections",
            budget,
            WORKER_SPARE_CONNECTIONS,
            concurrency + WORKER_SPARE_CONNECTIONS,
            extra={"event": "db_budget_below_concurrency"},
        )
    store = create_store_for(
        settings.database,
        settings.db,
        "stepline-worker",
        connections=concurrency + WORKER_SPARE_CONNECTIONS,
        pre_ping=False,
        held=concurrency,
        commit_batch=settings.worker.commit_batch,
        process_id=worker_id,
    )
    broker = create_broker(settings.amqp, settings.namespace, settings.broker)
    executor = StepExecutor(
        threads=concurrency,
        default_timeout=settings.worker.default_step_timeout,
        max_timeout=settings.worker.max_step_timeout,
        payload_limit=settings.max_payload_bytes,
        payloads=payloads,
    )
    replay_cache = ReplayCache(settings.worker.replay_cache_size)
    in_flight: set[asyncio.Task[Any]] = set()
    relay: OutboxRelay | None = None
    try:
        await connect_broker(broker, settings.amqp, deadline_s=startup_timeout_s, stopping=stopping)
        relay = OutboxRelay(store, broker, settings.outbox, hooks=hooks)
        relay.start_batching_deletes()
        handler = MessageHandler(
            store=store,
            relay=relay,
            dead_letter=broker.dead_letter,
            executor=executor,
            workflows=workflows,
            payload_limit=settings.max_payload_bytes,
            payloads=payloads,
            worker_id=worker_id,
            hooks=hooks,
            replay_cache=replay_cache,
            build_id=build_id,
            pools=frozenset(settings.worker.pools),
            limits_lease=settings.limits.lease,
            limits_reserve=concurrency if settings.limits.reserve is None else settings.limits.reserve,
            hold_limit=settings.worker.max_step_timeout,
        )
        slots = WorkSlots(concurrency)
        start_batch = settings.worker.start_batch if store.writes_start_batches else 1
        starts = StartBatcher(handler, store, relay, slots, start_batch)

        async def on_delivery(delivery: Delivery) -> None:
            task = asyncio.current_task()
            assert task is not None
            in_flight.add(task)
            try:
                if is_start(delivery.routing_key):
                    await starts.handle(delivery)
                else:
                    async with slots.hold(is_start=False):
                        await handler.handle(delivery)
            finally:
                in_flight.discard(task)

        await check_database(store, settings.database, deadline_s=startup_timeout_s, stopping=stopping)
        # What start-up made (modules, workflow code, schema, models) lives as long as the
        # process: out of the collector's sight, a full collection no longer walks it. One
        # took ~110 ms mid-run in the latency benchmark; the step-to-next maximum with it.
        gc.freeze()
        await broker.consume(
            sorted(workflows),
            on_delivery,
            prefetch=settings.worker.prefetch or 2 * concurrency,
            pools=tuple(settings.worker.pools),
            # Starts wait for slots behind running work: holding more than a slot's worth
            # would only keep them from an idle worker. A slot's worth is a batch of starts
            # (StartBatcher), and the next batch gathers while one is written.
            start_prefetch=concurrency if start_batch == 1 else max(concurrency, 2 * start_batch),
        )
        # After consume: the queues a schedule's starts go to exist before any is fired.
        # Retried as the start-up checks are: the worker consumes already, and a database that
        # refused a connection for a moment (no slot left) must not end it with its work in hand.
        # Asked to stop meanwhile: the drain below still lets the steps in hand commit.
        with contextlib.suppress(StopRequested):
            await retry_until(
                lambda: sync_declared_schedules(store, workflows, payloads),
                what=f"{store.service} (syncing declared schedules)",
                deadline_s=startup_timeout_s,
                retry_on=(SQLAlchemyError, OSError),
                stopping=stopping,
            )
        health = await _start_health(settings, store, broker)
        # The sweeper outlives the drain below: it keeps the rows of local steps still running fresh.
        drained = asyncio.Event()
        sweeper = asyncio.create_task(relay.run_sweeper(drained))
        outage_watch = asyncio.create_task(handler.watch_outage(drained))
        sampler = asyncio.create_task(
            _sample_queue_depths(broker, sorted(workflows), tuple(settings.worker.pools), hooks, stopping)
        )
        log.info(
            "worker consuming %s (pools %s) with concurrency %d, build %s",
            ", ".join(sorted(workflows)),
            ", ".join(settings.worker.pools),
            concurrency,
            build_id,
            extra={"event": "worker_started", "worker": worker_id, "build_id": build_id},
        )
        await stopping.wait()
        log.info("stopping: no new work; finishing in-flight steps", extra={"event": "worker_stopping"})
        await broker.stop_consuming()
        handler.stop_local_steps()
        handler.give_back_held()
        if in_flight:
            _, pending = await asyncio.wait(
                set(in_flight), timeout=settings.worker.shutdown_grace.total_seconds()
            )
            if pending:
                log.warning(
                    "%d steps did not finish within the grace period; they will be redelivered",
                    len(pending),
                    extra={"event": "worker_grace_expired"},
                )
                for task in pending:
                    task.cancel()
        await handler.close()
        drained.set()
        await sweeper
        outage_watch.cancel()  # a probe of a database that does not answer must not hold up the stop
        await asyncio.wait({outage_watch})
        await sampler
        if health is not None:
            await health.stop()
    except StopRequested as stopped:
        log.info("stopping before start-up finished: %s", stopped, extra={"event": "worker_stopping"})
    finally:
        if relay is not None:
            await relay.stop_batching_deletes()  # forget what in-flight steps published
        await broker.close()
        replay_cache.clear()
        executor.shutdown()
        await store.close()
        log.info("worker stopped", extra={"event": "worker_stopped", "worker": worker_id})


async def _sample_queue_depths(
    broker: Broker,
    workflows: list[str],
    pools: tuple[str, ...],
    hooks: Hooks | None,
    stopping: asyncio.Event,
    every_s: float = 15.0,
) -> None:
    """Report how many messages wait in each consumed queue, for the queue-depth gauge."""
    if hooks is None:
        return
    while not stopping.is_set():
        try:
            for queue, depth in (await broker.queue_depths(workflows, pools)).items():
                hooks.queue_depth(queue, depth)
        except BrokerError:
            pass  # an outage: the relay and the handler report it
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopping.wait(), timeout=every_s)


async def _start_health(settings: Settings, store: Store, broker: Broker) -> HealthServer | None:
    if settings.health_port is None:
        return None
    health = HealthServer(
        settings.health_port,
        {
            "database": store.answers,
            "broker": broker.is_connected,
            "consuming": broker.is_consuming,
        },
    )
    await health.start()
    return health
