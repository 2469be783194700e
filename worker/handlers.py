"""Handle one message: dispatch by kind, commit in one transaction, then ack; dead-letter poison."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from stepline.shared import faults, slots
from stepline.shared.broker import Delivery
from stepline.shared.codec import JSON, Payloads, is_offloaded
from stepline.shared.db.batch_starts import NewInstance
from stepline.shared.db.engine import is_unreachable
from stepline.shared.db.records import NewTimer, OutboxRow
from stepline.shared.db.store import Store
from stepline.shared.db.transaction import Transaction
from stepline.shared.errors import (
    BadPayloadError,
    BrokerError,
    ConcurrencyBusyError,
    ConcurrencyKeyError,
    InvalidParamsError,
    PayloadUnreadableError,
    TerminatedError,
    UnknownWorkflowError,
    UnroutableError,
)
from stepline.shared.failures import failure_record
from stepline.shared.history import History, ParentLink
from stepline.shared.hooks import Hooks, NoHooks
from stepline.shared.messages import (
    AdvanceMessage,
    EventMessage,
    StartMessage,
    StepMessage,
    WakeMessage,
    check_addressed,
    parse_message,
)
from stepline.shared.outbox import OutboxRelay
from stepline.shared.retrying import Outage
from stepline.shared.rollback import ROLLBACK_WITH_PARENT
from stepline.shared.states import InstanceStatus, StepKind
from stepline.worker import waits
from stepline.worker.committed import Committed, LocalStep
from stepline.worker.concurrency import Concurrency
from stepline.worker.executor import StepExecutor
from stepline.worker.limits import DEFAULT_LEASE, StepLimiter
from stepline.worker.plan import Planner, Transition, real_clock
from stepline.worker.replay.cache import ReplayCache
from stepline.worker.replay.engine import Outcome, Replay
from stepline.worker.reserves import SlotReserves
from stepline.worker.steps import StepRunner
from stepline.worker.workflow import Workflow

log = logging.getLogger("stepline.worker")

DeadLetter = Callable[[Delivery, str], Awaitable[None]]

# Errors of the database or the broker: the message is retried (in place, during an outage) or given back.
INFRASTRUCTURE_ERRORS = (SQLAlchemyError, BrokerError, OSError)
HOLD_RETRY_MAX_DELAY_S = 30.0
"""Longest wait between two tries of a delivery held through an outage."""


def is_outage(error: BaseException) -> bool:
    """Whether handling failed because the database or the broker cannot be reached, not for the message."""
    if isinstance(error, BrokerError):
        return not isinstance(error, UnroutableError)  # unroutable: a message without a queue
    return is_unreachable(error)


class MessageHandler:
    """The worker's engine: one transition per message kind, each ending in one transaction.

    Every transition follows the same rule: do the work, commit in one
    transaction that first locks the instance row and checks the message is
    still current, and only then ack. A stale or duplicate message is acked and
    dropped; a message that cannot be understood is dead-lettered with its reason.
    """

    def __init__(
        self,
        *,
        store: Store,
        relay: OutboxRelay,
        dead_letter: DeadLetter,
        executor: StepExecutor,
        workflows: Mapping[str, Workflow[Any, Any]],
        payload_limit: int,
        worker_id: str,
        payloads: Payloads | None = None,
        hooks: Hooks | None = None,
        retry_delay: float = 1.0,
        replay_cache: ReplayCache | None = None,
        local_budget_s: float = 1.0,
        clock: Callable[[], datetime] | None = None,
        build_id: str | None = None,
        pools: frozenset[str] | None = None,
        limits_lease: timedelta = DEFAULT_LEASE,
        limits_reserve: int = 0,
        hold_limit: timedelta = timedelta(minutes=25),
    ) -> None:
        self._hooks = hooks or NoHooks()
        self._store = store
        self._relay = relay
        self._dead_letter = dead_letter
        self._workflows = workflows
        self._payload_limit = payload_limit
        self._planner = Planner(payload_limit, self._hooks, clock or real_clock, payloads or Payloads())
        self._steps = StepRunner(
            store=store,
            planner=self._planner,
            executor=executor,
            worker_id=worker_id,
            cache=replay_cache,
            build_id=build_id,
            pools=pools,
            limiter=StepLimiter(
                store,
                limits_lease,
                reserves=SlotReserves(
                    store,
                    size=limits_reserve,
                    lease=limits_lease,
                    worker_id=worker_id,
                    publish=relay.publish_committed,
                ),
            ),
        )
        self._build_id = build_id  # recorded on the instances it starts
        self._retry_delay = retry_delay
        # A delivery held through an outage goes back after this (below RabbitMQ's consumer_timeout),
        # or at once when the worker stops.
        self._hold_limit_s = hold_limit.total_seconds()
        self._giving_back = asyncio.Event()
        # Handling fails for want of the database; a worker that no message reaches any
        # more learns that it is back from the probe (see watch_outage).
        self._outage = Outage("the database or the broker", log, probe=store.answers)
        self._runs_local_steps = True
        self._local_budget_s = local_budget_s

    async def watch_outage(self, stopping: asyncio.Event) -> None:
        """Until ``stopping``, end an open outage once the database answers, even if no message comes."""
        await self._outage.watch(stopping)

    async def close(self) -> None:
        """The worker stopped consuming and drained: give back what it holds ahead (its slot reserves)."""
        await self._steps.limiter.close()

    def stop_local_steps(self) -> None:
        """Run no more steps locally (the worker is stopping): publish their messages instead."""
        self._runs_local_steps = False

    def give_back_held(self) -> None:
        """The worker is stopping: deliveries held through an outage go back to the broker now."""
        self._giving_back.set()

    async def handle(self, delivery: Delivery) -> None:
        """Process one delivery to the end: acked, dead-lettered, or given back."""
        delivery = _settled_once(delivery)
        try:
            committed = await self._dispatch_holding(delivery)
        except BadPayloadError as exc:
            await self._reject(delivery, exc.reason)
            return
        except ConcurrencyBusyError as exc:  # cancel-oldest met the oldest instance mid-commit: try again
            log.info("start given back: %s", exc, extra={"event": "concurrency_busy"})
            await asyncio.sleep(self._retry_delay)
            await _quietly(delivery.requeue())
            return
        except INFRASTRUCTURE_ERRORS as exc:
            self._outage.failed(_brief(exc))
            await asyncio.sleep(self._retry_delay)
            await _quietly(delivery.requeue())
            return
        except Exception as exc:  # process edge: record, dead-letter, keep consuming
            log.exception("internal error handling a message", extra={"event": "handle_crashed"})
            await self._reject(delivery, f"internal error: {type(exc).__name__}: {exc}")
            return
        self._outage.recovered()
        # Ack only after the commit: a crash before this line redelivers the
        # message, and the attempt check turns the redelivery into a no-op.
        faults.crash_here(faults.CRASH_AFTER_COMMIT)
        if delivery.redelivered:
            await self._take_over(delivery, committed)
        # Acked once the steps run here after it are done too: if this worker dies
        # meanwhile, the broker gives the delivery back at once, and the redelivery
        # takes over the row of the step that was running here (see _take_over).
        await self._follow(committed)
        await _quietly(delivery.ack())

    async def _take_over(self, delivery: Delivery, committed: Committed) -> None:
        """A delivery back from a consumer that may have died: publish its instance's unsent rows now.

        That consumer may have been running the instance's next step itself, its
        message an unsent outbox row that it held (see ``_follow``): without this,
        the row waits until it is ``STEPLINE_OUTBOX__SWEEP_AFTER`` old and a sweep
        comes (3 to 7 s after the crash with the defaults).
        """
        try:
            instance_id = parse_message(delivery.body, limit=self._payload_limit).instance_id
            await self._relay.take_over(instance_id, keep=[row.id for row in committed.rows])
        except Exception:  # the rows are committed: the sweeper publishes them
            log.exception(
                "taking over a redelivered instance's rows failed", extra={"event": "take_over_failed"}
            )

    async def _dispatch_holding(self, delivery: Delivery) -> Committed:
        """``_dispatch``, tried again in place while the database or the broker cannot be reached.

        Giving the delivery back counts a delivery on a quorum queue each time, so
        an outage longer than a few back-offs would dead-letter healthy messages
        (``x-delivery-limit``). The delivery stays here instead, unacked, and is
        tried again with a capped back-off; its step code may run again, as on a
        redelivery, and the attempt check keeps the commit single. What raises
        goes to ``handle``: an error that is not an outage, or an outage once the
        worker stops or the delivery was held for ``hold_limit``.
        """
        held_since = time.monotonic()
        delay, tries = self._retry_delay, 0
        while True:
            try:
                committed = await self._dispatch(delivery)
            except INFRASTRUCTURE_ERRORS as exc:
                if not self._may_hold(exc, time.monotonic() - held_since + delay):
                    raise
                tries += 1
                self._outage.failed(_brief(exc))
                if tries == 1:
                    log.warning(
                        "database or broker unreachable: holding the delivery (%s) and retrying it here, "
                        "not requeued, so its delivery count does not grow: %s",
                        delivery.routing_key,
                        _brief(exc),
                        extra={"event": "delivery_held", "routing_key": delivery.routing_key},
                    )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._giving_back.wait(), delay * random.uniform(0.5, 1.0))
                delay = min(delay * 2, HOLD_RETRY_MAX_DELAY_S)
                continue
            if tries:
                log.info(
                    "held delivery (%s) handled after %d tries in place",
                    delivery.routing_key,
                    tries + 1,
                    extra={"event": "delivery_held_done", "routing_key": delivery.routing_key},
                )
            return committed

    def _may_hold(self, error: BaseException, held_s: float) -> bool:
        """Whether a delivery whose handling failed with ``error`` stays here to be tried again."""
        return is_outage(error) and not self._giving_back.is_set() and held_s <= self._hold_limit_s

    async def _follow(self, committed: Committed) -> None:
        """Publish what a commit wrote; run the step it planned here, then the one after, within a budget.

        A step run here skips the broker: its message stays an unsent outbox row
        that the relay keeps fresh (so no sweeper takes it over) and deletes once
        the step's own attempt has committed. If anything goes wrong, the row is
        let go and the sweeper publishes it: the step then runs the usual way.
        The budget returns the slot to queued deliveries now and then.
        """
        deadline = time.monotonic() + self._local_budget_s
        while True:
            local = committed.local
            if local is not None and not (self._runs_local_steps and time.monotonic() < deadline):
                local = None
            rows = committed.rows
            if local is not None:
                rows = [row for row in rows if row.id != local.row.id]
            try:
                await self._relay.publish_committed(rows)
            except Exception:  # the rows are committed: the sweeper publishes them
                log.exception("fast-path publish failed", extra={"event": "fast_path_failed"})
            if local is None:
                return
            self._relay.hold(local.row.id)
            try:
                committed = await self._steps.run(local.workflow, local.message, is_local=True)
            except Exception as exc:  # the row is still committed: the sweeper publishes it
                await self._relay.release(local.row.id, is_done=False)
                log.warning(
                    "local step failed; its message goes out the usual way: %s",
                    _brief(exc),
                    extra={"event": "local_step_failed", "instance_id": local.message.instance_id},
                )
                return
            # Its attempt is committed: a crash before the row is forgotten only republishes it.
            faults.crash_here(faults.CRASH_AFTER_COMMIT)
            await self._relay.release(local.row.id, is_done=True)

    async def _reject(self, delivery: Delivery, reason: str) -> None:
        log.warning(
            "dead-lettering message: %s",
            reason,
            extra={"event": "dead_lettered", "routing_key": delivery.routing_key},
        )
        self._hooks.dead_lettered(delivery.routing_key, reason)
        try:
            await self._dead_letter(delivery, reason)
        except BrokerError as exc:
            log.warning(
                "dead-lettering failed, giving message back: %s", exc, extra={"event": "dead_letter_failed"}
            )
            await asyncio.sleep(self._retry_delay)
            await _quietly(delivery.requeue())
            return
        await _quietly(delivery.ack())

    async def _dispatch(self, delivery: Delivery) -> Committed:
        message = parse_message(delivery.body, limit=self._payload_limit)
        workflow = self._workflows.get(message.workflow)
        if workflow is None:
            raise UnknownWorkflowError(message.workflow, list(self._workflows))
        if isinstance(message, StartMessage):
            return await self._start(workflow, message, delivery.headers)
        if isinstance(message, StepMessage):
            return await self._steps.run(workflow, message, settle=delivery.ack)
        if isinstance(message, WakeMessage):
            woken = await self._steps.wake_sleep(workflow, message)
            if woken is not None:
                return woken
        return Committed(await self._settle(workflow, message))

    async def _settle(
        self, workflow: Workflow[Any, Any], message: WakeMessage | EventMessage | AdvanceMessage
    ) -> list[OutboxRow]:
        """Wakes, events and advances run no user code: all of it happens under the instance lock."""
        async with self._store.transaction() as tx:
            lock = await tx.lock_instance(message.instance_id)
            history = None if lock is None else await tx.load_history(message.instance_id)
            if history is None:
                if isinstance(message, EventMessage):
                    raise BadPayloadError(f"no instance with id {message.instance_id!r} to send the event to")
                return []
            check_addressed(message, history.workflow)
            if isinstance(message, EventMessage):
                return await waits.deliver_event(tx, self._planner, workflow, history, message)
            if isinstance(message, AdvanceMessage) and message.reason == ROLLBACK_WITH_PARENT:
                return await waits.roll_back_with_parent(tx, self._planner, workflow, history, message.parent)
            if history.status.is_finished:
                return []
            if isinstance(message, WakeMessage) and _is_step(history, message):
                return await self._steps.end_lapsed(tx, workflow, history, message)
            if isinstance(message, WakeMessage):
                return await waits.settle_wake(
                    tx, self._planner, workflow, history, (message.step, message.occurrence)
                )
            return await waits.advance(tx, self._planner, workflow, history)

    async def _read_params(self, message: StartMessage) -> JSON:
        """The start's params, read from the payloads table if a client stored them apart."""
        if not is_offloaded(message.params):
            return message.params
        async with self._store.reading() as tx:
            return await tx.read_payload(message.params)

    def _new_instance(
        self, workflow: Workflow[Any, Any], message: StartMessage, headers: dict[str, str], read: JSON
    ) -> tuple[object, History, dict[str, Any]]:
        """A start's validated params, its history (nothing recorded yet) and its instance row's values.

        ``read`` is the message's params as ``_read_params`` gives them: the instance
        row keeps a reference to params stored apart.

        Raises:
            BadPayloadError: the params do not fit the workflow, or cannot be read.
        """
        payloads = self._planner.payloads
        try:
            params = workflow.validate_params(
                payloads.open(read, instance_id=message.instance_id, what="the params")
            )
        except InvalidParamsError as exc:
            raise BadPayloadError(exc.reason) from None
        except PayloadUnreadableError as exc:  # dead-lettered: `stepline dead replay` once the key is here
            raise BadPayloadError(str(exc)) from None
        stored = payloads.seal(read)  # a producer without the codec sent them plain
        kept = message.params if read is not message.params else stored
        parent = (
            ParentLink(
                message.parent.instance_id,
                message.parent.workflow,
                message.parent.step,
                message.parent.occurrence,
            )
            if message.parent
            else None
        )
        trace_context = self._hooks.instance_started(workflow.name, message.instance_id, headers)
        history = History(
            instance_id=message.instance_id,
            workflow=workflow.name,
            status=InstanceStatus.RUNNING,
            params=stored,
            version=0,
            trace_context=trace_context,
            parent=parent,
            created_at=datetime.now(UTC),
        )
        instance = {
            "instance_id": message.instance_id,
            "workflow": workflow.name,
            "params": kept,
            "trace_context": trace_context,
            "parent": parent,
            "build_id": self._build_id,
            "priority": message.priority,
        }
        return params, history, instance

    async def _start(
        self, workflow: Workflow[Any, Any], message: StartMessage, headers: dict[str, str]
    ) -> Committed:
        read = await self._read_params(message)
        params, history, instance = self._new_instance(workflow, message, headers, read)
        parent = history.parent
        if workflow.concurrency is not None:
            return Committed(
                await self._start_limited(workflow, workflow.concurrency, message, params, history, instance)
            )
        local = None
        with self._planner.replay(workflow, history) as replay:
            outcome = replay.start()
            transition = self._planner.plan_unlocked(history, replay, outcome)
            if transition is not None:
                # The usual start: one statement, no transaction around it (see Store.start_instance).
                started = await self._store.start_instance(
                    **instance,
                    new_steps=transition.new_steps,
                    status=transition.status,
                    output=transition.output,
                    error=transition.error,
                    messages=transition.messages,
                )
                if started is None:
                    async with self._store.transaction() as tx:
                        return Committed(await self._duplicate_start(tx, message, parent))
                rows = started
                if transition.status.is_finished:
                    self._planner.report_finished(history, outcome, transition.status)
                else:
                    # The cache takes the replay: the with block leaves it open for the next step.
                    local = self._steps.keep(workflow, history, replay, transition, rows)
            else:
                async with self._store.transaction() as tx:
                    created = await tx.insert_instance(**instance)
                    if not created:
                        return Committed(await self._duplicate_start(tx, message, parent))
                    rows = await self._planner.apply(tx, history, replay, outcome)
                # Committed: a first replay blocked on a sleep keeps its replay for the wake-up.
                local = self._steps.keep_armed(workflow, history, replay, outcome, rows)
        log.info("instance started", extra={"event": "instance_started", "instance_id": message.instance_id})
        return Committed(rows, local)

    def prepare_start(self, delivery: Delivery) -> PreparedStart | None:
        """A start delivery replayed to its first entry, for a batch (``StartBatcher``); None: it goes alone.

        None for what ``handle`` deals with better, one delivery at a time: what
        is not a valid start (dead-lettered there, with its reason), a workflow with
        a concurrency limit, a first replay ``Planner.plan_start`` cannot write.
        """
        try:
            message = parse_message(delivery.body, limit=self._payload_limit)
            workflow = self._workflows.get(message.workflow)
            if (
                not isinstance(message, StartMessage)
                or workflow is None
                or workflow.concurrency is not None
                or is_offloaded(message.params)  # read from the database first, alone
            ):
                return None
            _, history, instance = self._new_instance(workflow, message, delivery.headers, message.params)
        except BadPayloadError:
            return None
        replay = self._planner.replay(workflow, history)
        try:
            outcome = replay.start()
            planned = self._planner.plan_start(history, replay, outcome)
        except Exception:  # the usual way reports it
            planned = None
        if planned is None:
            replay.close()
            return None
        transition, sleeps = planned
        new = NewInstance(
            **instance,
            status=transition.status,
            new_steps=transition.new_steps,
            messages=transition.messages,
            sleeps=sleeps,
            output=transition.output,
            error=transition.error,
        )
        return PreparedStart(delivery, workflow, history, replay, outcome, transition, sleeps, new)

    def started(self, start: PreparedStart, rows: list[OutboxRow]) -> LocalStep | None:
        """A batch created ``start``'s instance: report its end, or keep its replay, as ``_start`` does.

        ``rows``: the outbox rows the batch wrote for this instance. Returns the
        step it planned that this worker may run itself (``run_local``), as a
        lone start runs its first step on the spot; its row is among ``rows``.
        """
        local = None
        with start.replay as replay:
            if start.transition.status.is_finished:
                self._planner.report_finished(start.history, start.outcome, start.transition.status)
            else:  # the cache takes the replay: its next step, or its wake-up, may run on it here
                local = self._steps.keep(start.workflow, start.history, replay, start.transition, rows)
        log.debug(
            "instance started", extra={"event": "instance_started", "instance_id": start.history.instance_id}
        )
        return local

    async def run_local(self, local: LocalStep) -> None:
        """Run a step a batch of starts planned, here, as a lone start's first step runs (``_follow``).

        The caller holds its unsent row (``OutboxRelay.hold``) from the commit on:
        a crash leaves it to the sweepers, and a worker that stops publishes it.
        """
        await self._follow(Committed([local.row], local))

    def recovered(self) -> None:
        """A batch of starts committed: the database answers (an open outage has ended)."""
        self._outage.recovered()

    async def _start_limited(
        self,
        workflow: Workflow[Any, Any],
        concurrency: Concurrency,
        message: StartMessage,
        params: object,
        history: History,
        instance: dict[str, Any],
    ) -> list[OutboxRow]:
        """Start an instance of a workflow with a concurrency limit: in a transaction, under its key's lock.

        It takes a slot and runs, or waits ``queued``, or ends ``terminated``
        (``cancel-newest``), or takes the slot of the oldest (``cancel-oldest``).
        A key function that fails refuses the start: the instance is stored ``errored``.
        """
        try:
            key = concurrency.key_of(workflow.name, params)
        except ConcurrencyKeyError as exc:
            return await self._refuse(message, history, instance, exc)
        instance_id, parent = history.instance_id, history.parent
        async with self._store.transaction() as tx:
            admission = await slots.admit(tx, workflow.name, key, concurrency.limit, concurrency.on_limit)
            created = await tx.insert_instance(
                **instance,
                status=InstanceStatus.RUNNING
                if admission.status == InstanceStatus.RUNNING
                else InstanceStatus.QUEUED,
                concurrency_key=key,
                concurrency_limit=concurrency.limit,
            )
            if not created:
                return await self._duplicate_start(tx, message, parent)
            if admission.status == InstanceStatus.QUEUED:
                log.info("instance queued", extra={"event": "instance_queued", "instance_id": instance_id})
                return []
            if admission.status == InstanceStatus.TERMINATED:
                assert admission.reason is not None
                error = failure_record(TerminatedError(admission.reason))
                await tx.update_instance(instance_id, status=InstanceStatus.TERMINATED, error=error)
                log.info(
                    "instance cancelled", extra={"event": "concurrency_cancelled", "instance_id": instance_id}
                )
                return await tx.insert_outbox(self._planner.parent_wake(parent))
            rows: list[OutboxRow] = []
            if admission.evict:
                rows += await slots.evict_oldest(
                    tx,
                    workflow.name,
                    key,
                    concurrency.limit,
                    newcomer=instance_id,
                    payload_limit=self._payload_limit,
                )
            started = replace(history, concurrency_key=key)
            with self._planner.replay(workflow, started) as replay:
                rows += await self._planner.apply(tx, started, replay, replay.start())
        log.info("instance started", extra={"event": "instance_started", "instance_id": instance_id})
        return rows

    async def _refuse(
        self, message: StartMessage, history: History, instance: dict[str, Any], error: ConcurrencyKeyError
    ) -> list[OutboxRow]:
        """Store an instance whose start is refused as ``errored``, with why; its parent hears of it."""
        async with self._store.transaction() as tx:
            created = await tx.insert_instance(**instance, status=InstanceStatus.QUEUED)
            if not created:
                return await self._duplicate_start(tx, message, history.parent)
            await tx.update_instance(
                history.instance_id, status=InstanceStatus.ERRORED, error=failure_record(error)
            )
            log.warning(
                "start refused: %s",
                error,
                extra={"event": "start_refused", "instance_id": history.instance_id},
            )
            return await tx.insert_outbox(self._planner.parent_wake(history.parent))

    async def _duplicate_start(
        self, tx: Transaction, message: StartMessage, parent: ParentLink | None
    ) -> list[OutboxRow]:
        existing = await tx.get_instance_row(message.instance_id)
        if existing is not None:
            check_addressed(message, existing.workflow)
        log.info(
            "instance exists; duplicate start ignored",
            extra={"event": "duplicate_start", "instance_id": message.instance_id},
        )
        if parent is None:
            return []
        # A child started before its parent asked (or asked again): make sure the parent hears of its end.
        await tx.set_parent_if_unset(message.instance_id, parent)
        if existing is not None and InstanceStatus(existing.status).is_finished:
            return await tx.insert_outbox(self._planner.parent_wake(parent))
        return []


@dataclass(frozen=True, slots=True)
class PreparedStart:
    """A start delivery replayed to its first entry, ready to be written with a batch."""

    delivery: Delivery
    workflow: Workflow[Any, Any]
    history: History
    replay: Replay
    """Open: the batch closes it, or the replay cache takes it once the batch committed."""
    outcome: Outcome
    transition: Transition
    sleeps: list[NewTimer]
    new: NewInstance


def _settled_once(delivery: Delivery) -> Delivery:
    """The delivery, acked or given back at most once.

    A long step acks its delivery once its lease is written, before its code
    runs (``StepRunner.run``'s ``settle``); what follows must neither ack it
    again (a second ack of one delivery closes an AMQP channel) nor give it back.
    """
    done = False

    async def once(action: Callable[[], Awaitable[None]]) -> None:
        nonlocal done
        if not done:
            done = True
            await action()

    return replace(delivery, _ack=lambda: once(delivery.ack), _requeue=lambda: once(delivery.requeue))


def _is_step(history: History, message: WakeMessage) -> bool:
    """Whether a wake-up names a step: a long step's lease fired."""
    record = history.step((message.step, message.occurrence))
    return record is not None and record.kind == StepKind.STEP


def _brief(exc: BaseException) -> str:
    if isinstance(exc, DBAPIError):
        text = str(exc.orig)
        return f"{type(exc.orig).__name__}: {text.splitlines()[0] if text else ''}"
    return f"{type(exc).__name__}: {exc}"


async def _quietly(action: Awaitable[None]) -> None:
    """Ack or requeue; if the channel is gone the broker redelivers, which is safe."""
    try:
        await action
    except Exception:  # a lost channel means redelivery, which fencing makes harmless
        log.debug("ack/requeue failed; the message will be redelivered", extra={"event": "ack_failed"})


__all__ = ["INFRASTRUCTURE_ERRORS", "MessageHandler", "is_outage"]
