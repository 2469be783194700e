"""``Client``: read, wait for and control instances; send them events; prune old ones."""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from stepline.producer import control
from stepline.producer.bulk import BulkAction, BulkOutcome, BulkRun, rule_of
from stepline.producer.models import AttemptInfo, EventInfo, InstanceInfo, PoolWait, ScheduleInfo, StepInfo
from stepline.shared import codec
from stepline.shared.broker import Broker, WorkflowQueue, create_broker
from stepline.shared.codec import PayloadCodec, Payloads
from stepline.shared.db.bulk_statements import InstanceSelection
from stepline.shared.db.limits import WAITING_FOR
from stepline.shared.db.records import OutboxRow
from stepline.shared.db.store import Store
from stepline.shared.db.stores import create_store_for
from stepline.shared.db.transaction import Transaction
from stepline.shared.durations import Duration, parse_duration
from stepline.shared.errors import (
    ConfigError,
    InstanceNotFoundError,
    InvalidParamsError,
    InvalidStateError,
    StorageError,
    UnregisteredWorkflowError,
    WaitTimeoutError,
)
from stepline.shared.messages import (
    EventMessage,
    check_event_id,
    check_id_prefix,
    check_instance_id,
    check_workflow_name,
    encode_message,
)
from stepline.shared.outbox import OutboxRelay
from stepline.shared.redaction import mask_url, scrub_password
from stepline.shared.settings import (
    CLIENT_CONNECTIONS,
    CLIENT_HELD_CONNECTIONS,
    BrokerSettings,
    DatabaseSettings,
    OutboxSettings,
    PayloadSettings,
)
from stepline.shared.states import InstanceStatus, StepKind, StepStatus
from stepline.shared.topology import pool_of, queue_name

if TYPE_CHECKING:
    # What only some methods use is imported in them: `stepline status` builds a Client to
    # read one instance and should not load the telemetry, the broker, cron parsing or the
    # diagnosis to do it (tests/unit/test_cli_imports.py).
    from stepline.producer.dead_letters import DeadLetters
    from stepline.producer.producer import Producer, WorkflowRef
    from stepline.shared.diagnosis import Diagnosis, Limits
    from stepline.shared.repair import RepairOutcome
    from stepline.shared.schedules import Schedule

T = TypeVar("T")

_PAGE = 500  # instances read per query when listing held ones


class Client:
    """Reads and controls instances.

    Use as ``async with Client(database_url, amqp_url) as c: info = await c.get(id)``.
    Reading needs only the database; ``send_event``, ``resume``, ``terminate``
    and ``restart`` also publish, so they need ``amqp_url``. ``database``
    bounds its connections and says whether PgBouncer is in between
    (``STEPLINE_DATABASE__*``; default: at most 8 connections). ``store``
    is an open store of the same database to read and write through instead of
    one of its own (the caller closes it): a process keeps one connection budget.
    ``payload`` (``STEPLINE_PAYLOAD__*``): params and event payloads over
    ``offload_above`` (256 KiB) are written to the ``payloads`` table first and
    sent as a reference, up to ``max_bytes`` (100 MiB).
    """

    def __init__(
        self,
        database_url: str,
        amqp_url: str | None = None,
        *,
        namespace: str = "stepline",
        max_payload_bytes: int = 1024 * 1024,
        broker: BrokerSettings | None = None,
        database: DatabaseSettings | None = None,
        codec: PayloadCodec | None = None,
        store: Store | None = None,
        payload: PayloadSettings | None = None,
    ) -> None:
        self._broker_settings = broker
        # Params and events leave sealed; what is read back is opened with this codec's keys, and
        # shown as ``ENCRYPTED`` where this process has none that fits. Past ``offload_above``
        # they are stored apart first and the message carries the reference.
        payload = payload or PayloadSettings()
        self._payloads = Payloads(codec, offload_above=payload.offload_above, max_bytes=payload.max_bytes)
        self._producer: Producer | None = None
        self._database_settings = database or DatabaseSettings()
        self._database_url = database_url
        self._amqp_url = amqp_url
        self._namespace = namespace
        self._limit = max_payload_bytes
        self._given_store = store
        self._store: Store | None = None
        self._broker: Broker | None = None
        self._relay: OutboxRelay | None = None

    async def __aenter__(self) -> Client:
        # Pre-ping on checkout: after a failover, the next call finds the new primary by itself.
        # One connection held out of the pool for single statements (``get``): no pre-ping each time.
        self._store = self._given_store or create_store_for(
            self._database_url,
            self._database_settings,
            "stepline-client",
            connections=CLIENT_CONNECTIONS,
            held=CLIENT_HELD_CONNECTIONS,
        )
        if self._amqp_url is not None:
            self._broker = create_broker(self._amqp_url, self._namespace, self._broker_settings)
            await self._broker.connect()
            self._relay = OutboxRelay(self._store, self._broker, OutboxSettings())
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._broker is not None:
            await self._broker.close()
        if self._store is not None and self._store is not self._given_store:
            await self._store.close()
        self._store = self._broker = self._relay = self._producer = None

    # ------------------------------------------------------------ reading

    async def get(self, instance_id: str) -> InstanceInfo | None:
        """The instance with its steps, or None if no instance has that id.

        Raises:
            InvalidIdError: ``instance_id`` could not be an id (as in every method taking one).
        """
        check_instance_id(instance_id)
        try:
            return await self._get(instance_id)
        except StorageError as exc:
            if not _is_lost_connection(exc.__cause__):
                raise
        return await self._get(instance_id)  # a held connection the server dropped (a failover): once more

    async def _get(self, instance_id: str) -> InstanceInfo | None:
        # Single statements on a held autocommit connection: no pre-ping, BEGIN or ROLLBACK
        # around them (three round trips of five; issue 23, `get` p99 under 10 ms). Each
        # statement of a read-only transaction saw its own snapshot anyway (READ COMMITTED).
        async with self._connection(single=True) as tx:
            row = await tx.get_instance_row(instance_id)
            if row is None:
                return None
            step_rows = await tx.get_step_rows(instance_id)
            params, output, *shown = await tx.show_payloads(
                self._payloads,
                [
                    row.params,
                    row.output,
                    *(value for step in step_rows for value in (step.result, step.heartbeat)),
                ],
            )
        steps = [_step(step, *shown[2 * at : 2 * at + 2]) for at, step in enumerate(step_rows)]
        return _instance(row, steps, params, output)

    async def list(
        self,
        *,
        workflow: str | None = None,
        status: str | None = None,
        limit: int = 50,
        offset: int = 0,
        created_after: datetime | None = None,
        created_before: datetime | None = None,
        id_prefix: str | None = None,
        build_id: str | None = None,
    ) -> builtins.list[InstanceInfo]:
        """Instances, newest first (without their steps), one page at a time.

        ``workflow``, ``status`` and ``build_id`` (the build of the worker that
        started the instance) match exactly (no wildcards). ``id_prefix`` keeps the
        instances whose id starts with it, exactly: case-sensitive, and ``%`` or ``_`` are
        characters like any other.

        Raises:
            ValueError: ``status`` is not a status.
            InvalidIdError: ``id_prefix`` holds a character no id can hold.
        """
        if status is not None:
            InstanceStatus(status)  # a clear ValueError for a status that does not exist
        if id_prefix is not None:
            check_id_prefix(id_prefix)
        async with self._connection() as tx:
            rows = await tx.list_instance_rows(
                workflow=workflow,
                status=status,
                limit=limit,
                offset=offset,
                created_after=created_after,
                created_before=created_before,
                id_prefix=id_prefix,
                build_id=build_id,
            )
            return await self._instances(tx, rows)

    async def attempts(self, instance_id: str) -> builtins.list[AttemptInfo]:
        """Every finished step attempt of an instance, oldest first."""
        check_instance_id(instance_id)
        async with self._connection() as tx:
            rows = await tx.get_attempt_rows(instance_id)
        return [
            AttemptInfo(
                step=row.name,
                occurrence=row.occurrence,
                attempt=row.attempt,
                worker=row.worker,
                outcome=row.outcome,
                error=row.error,
                started_at=row.started_at,
                finished_at=row.finished_at,
                build_id=row.build_id,
                retry_at=row.retry_at,
            )
            for row in rows
        ]

    async def recorded_values(self, instance_id: str) -> builtins.list[dict[str, Any]]:
        """The values ``ctx.now()``, ``ctx.random()`` and ``ctx.uuid()`` recorded, for replay checks."""
        check_instance_id(instance_id)
        async with self._connection() as tx:
            rows = await tx.get_value_rows(instance_id)
            results = await tx.show_payloads(self._payloads, [row.result for row in rows])
        return [
            {
                "name": row.name,
                "occurrence": row.occurrence,
                "position": row.position,
                "kind": "value",
                "status": "succeeded",
                "result": result,
            }
            for row, result in zip(rows, results, strict=True)
        ]

    async def events(self, instance_id: str) -> builtins.list[EventInfo]:
        """Every event an instance received, oldest first, and which wait took it."""
        check_instance_id(instance_id)
        async with self._connection() as tx:
            rows = await tx.get_event_rows(instance_id)
            payloads = await tx.show_payloads(self._payloads, [row.payload for row in rows])
        return [
            EventInfo(
                event_id=row.event_id,
                event_type=row.event_type,
                payload=payload,
                created_at=row.created_at,
                consumed_by=row.consumed_step,
                consumed_at=row.consumed_at,
            )
            for row, payload in zip(rows, payloads, strict=True)
        ]

    async def pool_waits(self, info: InstanceInfo) -> builtins.list[PoolWait]:
        """The instance's steps bound for a worker pool, each with its pool's queue as the broker sees it.

        Only the steps still to run (running or retrying) of an instance that is
        running or waiting: a paused one sends nothing. A wait with no consumer
        (``is_unserved``) waits in its queue until a worker of the pool starts.

        Raises:
            ConfigError: the client has no ``amqp_url``.
            BrokerError: the broker did not answer.
        """
        if info.status not in (InstanceStatus.RUNNING, InstanceStatus.WAITING):
            return []
        pending = [
            step
            for step in info.steps
            if step.pool is not None
            and step.kind == StepKind.STEP
            and step.status in (StepStatus.RUNNING, StepStatus.RETRYING)
        ]
        if not pending:
            return []
        broker = self._broker_needed("pool_waits")
        waits = []
        for step in pending:
            assert step.pool is not None
            queue = await broker.workflow_queue(info.workflow, step.pool)
            waits.append(
                PoolWait(
                    step=step.name,
                    occurrence=step.occurrence,
                    pool=step.pool,
                    queue=queue_name(self._namespace, info.workflow, step.pool),
                    messages=queue.messages if queue is not None else None,
                    consumers=queue.consumers if queue is not None else 0,
                )
            )
        return waits

    async def queue(self, workflow: str, pool: str | None = None) -> WorkflowQueue | None:
        """A workflow's queue (of ``pool``) as the broker sees it now; None if nothing declared it yet.

        Raises:
            ConfigError: the client has no ``amqp_url``.
        """
        return await self._broker_needed("queue").workflow_queue(workflow, pool)

    async def why(self, instance_id: str, *, limits: Limits | None = None) -> Diagnosis:
        """What the instance waits on, since when, what will move it, and whether anything is wrong.

        Reads the database; with ``amqp_url``, also asks the broker whether a worker
        consumes the pools its pending steps wait for. ``limits``: the grace and
        default step timeout to judge by (default: the settings' defaults).
        ``stepline.producer.why.why_text`` words it as ``stepline why`` prints it.

        Raises:
            InstanceNotFoundError: no instance has that id.
        """
        from stepline.producer import why as diagnosing

        check_instance_id(instance_id)
        async with self._connection() as tx:
            diagnosis = await diagnosing.diagnose_instance(
                tx, instance_id, limits or diagnosing.default_limits()
            )
        if diagnosis is None:
            raise InstanceNotFoundError(instance_id)
        if self._broker is not None and diagnosis.state in ("running", "waiting"):
            info = await self._must_get(instance_id)
            diagnosis = diagnosing.with_pools(diagnosis, await self.pool_waits(info))
        return diagnosis

    async def repair(self, instance_id: str, *, limits: Limits | None = None) -> RepairOutcome:
        """Re-plan the instance if nothing will move it (what the scheduler's reconciler does); else nothing.

        Returns what was found (``diagnosis``) and what was done (``done``, empty if
        it was not stranded).

        Raises:
            InstanceNotFoundError: no instance has that id.
        """
        from stepline.producer import why as diagnosing
        from stepline.shared import repair as repairs

        check_instance_id(instance_id)
        outcome: builtins.list[RepairOutcome] = []

        async def action(tx: Transaction) -> builtins.list[OutboxRow]:
            found = await repairs.repair(
                tx, instance_id, limits or diagnosing.default_limits(), payload_limit=self._limit
            )
            outcome.append(found)
            return found.rows

        await self._control(action, publishes=True)
        if outcome[0].diagnosis is None:
            raise InstanceNotFoundError(instance_id)
        return outcome[0]

    # DESIGN.md names the parameter: wait(id, timeout) polls with its own deadline.
    async def wait(self, instance_id: str, timeout: Duration = 60) -> InstanceInfo:  # noqa: ASYNC109
        """Poll until the instance is complete, errored or terminated, and return it.

        Raises:
            WaitTimeoutError: it did not finish within ``timeout``.
        """
        check_instance_id(instance_id)
        limit_s = parse_duration(timeout).total_seconds()
        deadline = time.monotonic() + limit_s
        delay = 0.02
        while True:
            info = await self.get(instance_id)
            if info is not None and info.is_finished:
                return info
            if time.monotonic() >= deadline:
                raise WaitTimeoutError(instance_id, limit_s, info.status if info else None)
            await asyncio.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 1.5, 0.5)

    # ------------------------------------------------------------ control

    async def pause(self, instance_id: str) -> InstanceInfo:
        """No new step of the instance starts until ``resume``; a running step still commits.

        Raises:
            InstanceNotFoundError, InvalidStateError: unknown, or not running or waiting.
        """
        check_instance_id(instance_id)
        await self._control(lambda tx: _no_rows(control.pause(tx, instance_id)))
        return await self._must_get(instance_id)

    async def resume(self, instance_id: str) -> InstanceInfo:
        """Let a paused (or held) instance go on: a worker replays it and sends what was held back.

        Raises:
            InstanceNotFoundError, InvalidStateError: unknown, or not paused.
        """
        check_instance_id(instance_id)
        await self._control(lambda tx: control.resume(tx, instance_id, limit=self._limit), publishes=True)
        return await self._must_get(instance_id)

    async def held(self, workflow: str) -> builtins.list[InstanceInfo]:
        """Every held instance of ``workflow`` (paused because its replay diverged), newest first.

        A plain paused instance is not held: it has no error.
        """
        found: builtins.list[InstanceInfo] = []
        after: tuple[datetime, str] | None = None
        while True:
            async with self._connection() as tx:
                rows = await tx.list_instance_rows(workflow=workflow, held=True, limit=_PAGE, after=after)
                found.extend(await self._instances(tx, rows))
            if len(rows) < _PAGE:
                return found
            after = (rows[-1].created_at, rows[-1].id)

    async def resume_held(self, workflow: str, *, progress: Callable[[int, int], None] | None = None) -> int:
        """Resume every held instance of ``workflow`` (after a deploy that fixes its code).

        The bulk resume of the held ones (``bulk("resume", workflow=..., held=True)``):
        each is resumed as ``resume`` does; one that is no longer paused by then is
        skipped. ``progress`` is told how many were handled so far and how many
        there are. Returns how many were resumed.
        """
        outcome = await self.bulk("resume", workflow=workflow, held=True, progress=progress)
        return outcome.changed

    async def terminate(
        self, instance_id: str, *, rollback: bool = False, children: bool = False
    ) -> InstanceInfo:
        """Stop the instance and its children for good; raises ``InvalidStateError`` if finished.

        Args:
            instance_id: the instance.
            rollback: first run the compensations of its committed steps (newest first, each
                a durable step); it ends ``terminated`` once they have run, and shows
                ``rolling_back`` until then.
            children: also terminate the children it started with ``ctx.start_child``
                (children it waits for with ``ctx.child`` always end with it).
        """
        check_instance_id(instance_id)
        await self._control(
            lambda tx: control.terminate(
                tx, instance_id, limit=self._limit, rollback=rollback, children=children
            ),
            publishes=True,
        )
        return await self._must_get(instance_id)

    async def restart(self, instance_id: str) -> InstanceInfo:
        """Clear the instance's history and run it again from the beginning, under the same id."""
        check_instance_id(instance_id)
        await self._control(lambda tx: control.restart(tx, instance_id, limit=self._limit), publishes=True)
        return await self._must_get(instance_id)

    async def bulk(
        self,
        action: BulkAction,
        *,
        workflow: str | None = None,
        status: str | None = None,
        created_after: datetime | None = None,
        build_id: str | None = None,
        held: bool = False,
        batch_size: int = 500,
        dry_run: bool = False,
        progress: Callable[[int, int], None] | None = None,
        rollback: bool = False,
        children: bool = False,
    ) -> BulkOutcome:
        """Pause, resume, terminate or restart every instance that fits all the filters given.

        Each instance gets the rule of the single-id method (``pause``...): one
        whose status no longer fits the filter by the time its batch locks it, or
        that the rule refuses, is skipped with the reason. Instances go
        ``batch_size`` per transaction, by id, each batch's messages published
        after its commit. ``progress`` is told how many were handled and how
        many there are. With ``dry_run`` nothing changes: the outcome counts the
        matches and shows the first ids. ``rollback`` and ``children`` are those of
        ``terminate``.

        Raises:
            ValueError: no filter is given, ``status`` is not a status, ``action`` is unknown,
                or ``rollback``/``children`` is given with another action than terminate.
            ConfigError: the action publishes (all but pause) and the client has no ``amqp_url``.
        """
        rule = rule_of(action, payload_limit=self._limit, rollback=rollback, children=children)
        selection = InstanceSelection(
            workflow=workflow,
            status=InstanceStatus(status) if status is not None else None,
            created_after=created_after,
            build_id=build_id,
            held=held,
        )
        run = BulkRun(
            selection,
            reading=lambda: self._connection(),
            writing=lambda: self._connection(begin=True),
            batch_size=batch_size,
        )
        if dry_run:
            return await run.dry_run(action)
        if action != "pause":
            self._broker_needed(f"bulk {action}")
        return await run.apply(action, rule, self._publish_committed, progress)

    async def _publish_committed(self, rows: builtins.list[OutboxRow]) -> None:
        if self._relay is not None and rows:
            await self._relay.publish_committed(rows)

    async def start(
        self,
        workflow: str | WorkflowRef,
        params: object = None,
        *,
        instance_id: str | None = None,
        allow_unregistered: bool = False,
        priority: int = 0,
    ) -> str:
        """Publish a start event as ``Producer.start`` does; params of any size up to ``max_bytes``.

        Params over ``offload_above`` are written to the ``payloads`` table first
        (compressed, sealed if a codec is set) and the message carries only their
        reference. A start that never makes an instance (dead-lettered) leaves that
        row behind until a ``prune`` older than its age.

        Raises:
            As ``Producer.start``; PayloadTooLargeError over ``STEPLINE_PAYLOAD__MAX_BYTES``;
            ConfigError: the client has no ``amqp_url``.
        """
        starter = self._starter()
        return await starter.start(
            workflow,
            params,
            instance_id=instance_id,
            allow_unregistered=allow_unregistered,
            priority=priority,
        )

    async def start_batch(
        self,
        workflow: str | WorkflowRef,
        params: Iterable[object],
        *,
        instance_ids: Sequence[str] | None = None,
        allow_unregistered: bool = False,
        priority: int = 0,
    ) -> builtins.list[str]:
        """Publish many start events as ``Producer.start_batch`` does, storing large params as ``start``."""
        return await self._starter().start_batch(
            workflow,
            params,
            instance_ids=instance_ids,
            allow_unregistered=allow_unregistered,
            priority=priority,
        )

    def _starter(self) -> Producer:
        """A Producer publishing through this client's broker, storing large params through its database."""
        if self._producer is None:
            from stepline.producer.producer import Producer

            self._producer = Producer(
                self._amqp_url or "",
                namespace=self._namespace,
                max_payload_bytes=self._limit,
                codec=self._payloads.codec,
                publisher=self._broker_needed("start"),
                offload=lambda instance_id, params: self._offload(instance_id, params, "the start's params"),
            )
        return self._producer

    async def _offload(self, instance_id: str, value: Any, what: str) -> Any:
        """``value`` as a message carries it: sealed, and past ``offload_above`` a reference to its row."""
        carried, row = self._payloads.offload(value, what=what)
        if row is not None:
            async with self._connection(begin=True) as tx:
                await tx.insert_payload(instance_id, row)
        return carried

    async def send_event(
        self, instance_id: str, event_type: str, payload: object = None, *, event_id: str | None = None
    ) -> str:
        """Send an event; the instance's earliest wait for ``event_type`` takes it, or keeps it.

        Returns the event id (a new UUID unless given; resending the same id is harmless).

        Raises:
            InstanceNotFoundError: no such instance.
            InvalidStateError: the instance is finished.
            InvalidParamsError: the payload is not JSON.
            InvalidIdError: the instance id or the event id could not be an id.
        """
        check_instance_id(instance_id)
        event_id = check_event_id(event_id) if event_id is not None else str(uuid.uuid4())
        async with self._connection() as tx:
            row = await tx.get_instance_row(instance_id)
        if row is None:
            raise InstanceNotFoundError(instance_id)
        if InstanceStatus(row.status).is_finished:
            raise InvalidStateError(instance_id, "send an event to", row.status, "not yet finished")
        try:
            data = codec.to_payload(payload)
        except (TypeError, ValueError) as exc:
            raise InvalidParamsError(row.workflow, f"event payload is not JSON: {exc}") from None
        broker = self._broker_needed("send_event")
        message = EventMessage(
            workflow=row.workflow,
            instance_id=instance_id,
            event_id=event_id,
            event_type=event_type,
            payload=await self._offload(instance_id, data, f"the payload of event {event_type!r}"),
        )
        body = encode_message(message, limit=self._limit)
        await broker.publish(message.routing_key, body, row.trace_context)
        return message.event_id

    async def prune(
        self, older_than: Duration, *, batch_size: int = 500, progress: Callable[[int], None] | None = None
    ) -> int:
        """Delete instances finished longer than ``older_than`` ago, with all their rows.

        Works in batches of ``batch_size`` (each its own short transaction, so
        running work is never blocked for long); ``progress`` is told the running
        total after each batch. Returns how many instances were deleted. Their
        payloads stored apart go with them, and so do the payloads written more
        than ``older_than`` ago for starts that never made an instance.
        """
        age = parse_duration(older_than)
        total = 0
        while True:
            async with self._connection(begin=True) as tx:
                deleted = await tx.prune_finished(older_than=age, limit=batch_size)
            total += deleted
            if progress is not None:
                progress(total)
            if deleted < batch_size:
                break
        async with self._connection(begin=True) as tx:
            await tx.delete_orphan_payloads(older_than=age)
        return total

    # ------------------------------------------------------------ dead letters

    @property
    def dead_letters(self) -> DeadLetters:
        """The namespace's dead-letter queue: list, show, replay, discard.

        Raises:
            ConfigError: the client has no ``amqp_url``.
        """
        from stepline.producer.dead_letters import DeadLetters

        return DeadLetters(self._broker_needed("dead letters"))

    # ------------------------------------------------------------ schedules

    async def create_schedule(
        self,
        schedule_id: str,
        workflow: str | WorkflowRef,
        schedule: Schedule,
        *,
        allow_unregistered: bool = False,
    ) -> ScheduleInfo:
        """Create a run-time schedule (or replace the run-time schedule of that id); returns it.

        The workflow must be registered, as for ``Producer.start`` (a worker
        serving it has run in the namespace), unless ``allow_unregistered``.
        Given the workflow object, ``schedule.params`` are validated against it
        now; given its name, they are checked to be JSON, and the worker
        validates them at each start (a start whose params do not fit is
        dead-lettered with the reason: ``stepline dead list``).

        Raises:
            InvalidScheduleError: the id is not a schedule id, or the params do not fit the workflow.
            UnregisteredWorkflowError: no worker serving the workflow has run here.
            ScheduleConflictError: a schedule declared in code has this id.
            BadPayloadError: the params make a start event over the payload limit.
        """
        from stepline.producer import schedules as schedule_actions
        from stepline.shared.schedules import (
            InvalidScheduleError,
            check_schedule_id,
            start_message,
            tick_instance_id,
        )

        check_schedule_id(schedule_id)
        name = workflow if isinstance(workflow, str) else workflow.name
        try:
            check_workflow_name(name)
        except ValueError as exc:
            raise InvalidScheduleError("workflow", name, str(exc)) from None
        if not isinstance(workflow, str):
            try:
                workflow.encode_params(schedule.params)
            except InvalidParamsError as exc:
                raise InvalidScheduleError(
                    "params", schedule.params, f"do not fit the workflow: {exc.detail}", workflow=name
                ) from None
        start_message(  # the start each tick sends, with the params as stored: sealed
            name,
            tick_instance_id(schedule_id, datetime.now(UTC)),
            schedule.to_row(self._payloads)["params"],
            limit=self._limit,
        )
        broker = self._broker_needed("create_schedule (it checks the workflow is registered)")
        if allow_unregistered:
            await broker.ensure_workflow_queue(name)
        elif await broker.workflow_queue(name) is None:
            raise UnregisteredWorkflowError(name, self._namespace)
        async with self._connection(begin=True) as tx:
            return await schedule_actions.create(tx, schedule_id, name, schedule, self._payloads)

    async def list_schedules(self, *, workflow: str | None = None) -> builtins.list[ScheduleInfo]:
        """Every schedule (of one workflow), by id, each with its next five fire times."""
        from stepline.producer import schedules as schedule_actions

        async with self._connection() as tx:
            return await schedule_actions.list_all(tx, workflow, self._payloads)

    async def get_schedule(self, schedule_id: str) -> ScheduleInfo:
        """One schedule. Raises ``ScheduleNotFoundError`` if no schedule has this id."""
        from stepline.producer import schedules as schedule_actions

        async with self._connection() as tx:
            return await schedule_actions.get(tx, schedule_id, self._payloads)

    async def pause_schedule(self, schedule_id: str) -> ScheduleInfo:
        """Stop firing a schedule until ``resume_schedule``. Raises ``ScheduleNotFoundError``."""
        from stepline.producer import schedules as schedule_actions

        async with self._connection(begin=True) as tx:
            return await schedule_actions.pause(tx, schedule_id, self._payloads)

    async def resume_schedule(self, schedule_id: str) -> ScheduleInfo:
        """Fire a paused schedule again from its next tick; ticks missed while paused are not started."""
        from stepline.producer import schedules as schedule_actions

        async with self._connection(begin=True) as tx:
            return await schedule_actions.resume(tx, schedule_id, self._payloads)

    async def delete_schedule(self, schedule_id: str) -> None:
        """Delete a schedule (its instances run on). Raises ``ScheduleNotFoundError``."""
        from stepline.producer import schedules as schedule_actions

        async with self._connection(begin=True) as tx:
            await schedule_actions.delete(tx, schedule_id)

    async def trigger_schedule(self, schedule_id: str) -> str:
        """Start one instance of the schedule now; returns its id, ``<schedule id>@<now with ms>Z``.

        Overlap and pause are not consulted: a trigger is an operator's explicit start.
        """
        from stepline.producer import schedules as schedule_actions

        self._broker_needed("trigger_schedule")
        started: builtins.list[str] = []

        async def action(tx: Transaction) -> builtins.list[OutboxRow]:
            instance_id, rows = await schedule_actions.trigger(tx, schedule_id, payload_limit=self._limit)
            started.append(instance_id)
            return rows

        await self._control(action, publishes=True)
        return started[0]

    # ------------------------------------------------------------ internals

    async def _control(
        self,
        action: Callable[[Transaction], Awaitable[builtins.list[OutboxRow]]],
        *,
        publishes: bool = False,
    ) -> None:
        relay = self._relay
        if publishes and relay is None:
            self._broker_needed("this action")
        async with self._connection(begin=True) as tx:
            rows = await action(tx)
        if relay is not None:
            await relay.publish_committed(rows)  # workers' sweepers cover a failure here

    async def _instances(self, tx: Transaction, rows: Sequence[Any]) -> builtins.list[InstanceInfo]:
        """Instances rows as listed (without their steps), params and outputs read by ``show_payloads``."""
        shown = await tx.show_payloads(
            self._payloads, [value for row in rows for value in (row.params, row.output)]
        )
        return [_instance(row, [], *shown[2 * at : 2 * at + 2]) for at, row in enumerate(rows)]

    async def _must_get(self, instance_id: str) -> InstanceInfo:
        info = await self.get(instance_id)
        if info is None:
            raise InstanceNotFoundError(instance_id)
        return info

    def _broker_needed(self, what: str) -> Broker:
        if self._broker is None:
            raise ConfigError(f"{what} publishes to RabbitMQ: create the Client with amqp_url")
        return self._broker

    @asynccontextmanager
    async def _connection(self, *, begin: bool = False, single: bool = False) -> AsyncIterator[Transaction]:
        """The store's statements (in a transaction if ``begin``; on a held autocommit connection if
        ``single``); driver errors become one clear StorageError, password hidden."""
        if self._store is None:
            raise RuntimeError("use the Client as 'async with Client(...) as client'")
        opened: contextlib.AbstractAsyncContextManager[Transaction]
        if begin:
            opened = self._store.transaction()
        else:
            opened = self._store.statements() if single else self._store.reading()
        try:
            async with opened as tx:
                yield tx
        except SQLAlchemyError as exc:
            lines = str(getattr(exc, "orig", None) or exc).strip().splitlines()
            cause = lines[0] if lines else type(exc).__name__
            if _is_missing_schema(getattr(exc, "orig", None)):
                cause += " (the schema is older than this code: run `stepline db upgrade`)"
            cause = scrub_password(cause, self._database_url)
            raise StorageError(f"database error on {mask_url(self._database_url)}: {cause}") from exc
        except OSError as exc:
            raise StorageError(
                f"database unreachable at {mask_url(self._database_url)}: "
                f"{scrub_password(str(exc), self._database_url)}"
            ) from exc


def _is_lost_connection(error: BaseException | None) -> bool:
    """Whether a driver error says the connection was lost (SQLAlchemy invalidated it)."""
    return isinstance(error, DBAPIError) and error.connection_invalidated


def _is_missing_schema(error: BaseException | None) -> bool:
    """A PostgreSQL "no such table/column" error: the schema is older than the code.

    psycopg is imported only when a database error is explained, so an embedded
    (SQLite) ``stepline status`` never loads it.
    """
    from psycopg.errors import UndefinedColumn, UndefinedTable

    return isinstance(error, UndefinedTable | UndefinedColumn)


async def _no_rows(action: Awaitable[None]) -> list[OutboxRow]:
    await action
    return []


def _instance(row: Any, steps: builtins.list[StepInfo], params: Any, output: Any) -> InstanceInfo:
    """An instances row as shown, with its params and output as ``show_payloads`` read them."""
    return InstanceInfo(
        id=row.id,
        workflow=row.workflow,
        status=row.status,
        params=params,
        output=output,
        error=row.error,
        created_at=row.created_at,
        updated_at=row.updated_at,
        finished_at=row.finished_at,
        trace_context=row.trace_context,
        parent_id=row.parent_id,
        build_id=row.build_id,
        priority=row.priority,
        concurrency_key=row.concurrency_key,
        steps=steps,
        rolling_back=not InstanceStatus(row.status).is_finished
        and any(step.kind == StepKind.ROLLBACK for step in steps),
    )


def _step(row: Any, result: Any, heartbeat: Any) -> StepInfo:
    """A step row as shown, with its result and last heartbeat's details as ``show_payloads`` read them."""
    return StepInfo(
        name=row.name,
        occurrence=row.occurrence,
        kind=row.kind,
        status=row.status,
        attempts=row.attempt,
        result=result,
        error=row.error,
        started_at=row.started_at,
        finished_at=row.finished_at,
        pool=pool_of(row.detail) if row.kind == StepKind.STEP else None,
        waiting_for=_waiting_for(row.detail),
        heartbeat=heartbeat,
        heartbeat_at=row.heartbeat_at,
    )


def _waiting_for(detail: Any) -> str | None:
    """The reason a step waits for a limit, as the limit statements store it in its detail."""
    waiting = detail.get(WAITING_FOR) if isinstance(detail, dict) else None
    return str(waiting.get("reason")) if isinstance(waiting, dict) else None


__all__ = ["Client"]
