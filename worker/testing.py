"""Test workflows in-process on the real engine, on virtual time; and check recorded histories.

``WorkflowEnvironment`` runs the worker's own message handling and the
scheduler's own timer firing over the embedded store (an SQLite file in a
temporary directory), in the test's process and event loop. Its clock is
virtual: the store's clock and ``ctx.now()`` read it, and when nothing is left
to run the environment moves it to the next sleep or retry back-off, so
``ctx.sleep("30 days")`` and hour-long back-offs complete at once. A step's own
code lets time pass with ``env.sleep(duration)`` (work that takes that long:
a long step heartbeats meanwhile, or loses its lease). Time never
skips past a pending event wait by itself: a test sends the event, or calls
``run.advance()`` to time it out. Child workflows run as runs of their own
(``run.children``) on the same clock.

Nothing here plans, fires or settles anything itself: what a test sees is what
the engine does, so a feature works in tests the day it works in the engine.

``check_replay`` replays a history recorded in production (``stepline history
--json``) against the current code, so a deploy that would break running
instances fails in CI instead.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
import uuid
import weakref
from collections import Counter, defaultdict, deque
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection

from stepline.shared import codec, termination
from stepline.shared.broker import Delivery
from stepline.shared.codec import JSON, PayloadCodec, Payloads
from stepline.shared.db import stores
from stepline.shared.db.store import Store
from stepline.shared.durations import Duration, parse_duration
from stepline.shared.errors import BadPayloadError, NonDeterminismError, SteplineError
from stepline.shared.history import History, StepKey, StepRecord, format_key
from stepline.shared.messages import (
    AnyMessage,
    EventMessage,
    StartMessage,
    check_instance_id,
    check_priority,
    encode_message,
    parse_message,
)
from stepline.shared.outbox import OutboxRelay
from stepline.shared.schedule_firing import fire_due_schedules
from stepline.shared.settings import OutboxSettings
from stepline.shared.states import InstanceStatus, StepKind, StepStatus
from stepline.worker.context import StepCall
from stepline.worker.executor import StepExecutor, StepResult
from stepline.worker.handlers import MessageHandler
from stepline.worker.limits import DEFAULT_LEASE
from stepline.worker.replay.engine import Replay
from stepline.worker.schedules import sync_declared_schedules
from stepline.worker.step_info import RunningStep, step_info
from stepline.worker.workflow import Workflow

__all__ = ["HistoryEntry", "WorkflowEnvironment", "WorkflowRun", "check_replay"]

# Timers that move virtual time by themselves; an event's time-out waits for advance().
_AUTOMATIC_TIMERS = ("sleep", "retry")
# A delivery given back this often (the store failed each time) stops the run with the cause.
_MAX_REQUEUES = 3


@dataclass(frozen=True, slots=True)
class HistoryEntry:
    """One step, sleep or wait of a test run, as ``stepline history`` would show it."""

    name: str
    occurrence: int
    kind: str
    status: str
    attempts: int
    result: JSON
    error: dict[str, Any] | None


@dataclass(frozen=True, slots=True)
class _Snapshot:
    """An instance as the store held it when the environment last stopped."""

    status: str
    output: JSON
    error: dict[str, Any] | None
    history: list[HistoryEntry]
    children: list[str]
    """The ids of the children it started, in the order its code started them."""


@dataclass(frozen=True, slots=True)
class _DeadLetter:
    message: AnyMessage | None
    reason: str


class WorkflowRun:
    """One workflow instance run by a ``WorkflowEnvironment``; what it shows is read from the store."""

    def __init__(self, env: WorkflowEnvironment, workflow: Workflow[Any, Any], instance_id: str) -> None:
        self._env = env
        self.workflow = workflow
        self.instance_id = instance_id

    @property
    def _snapshot(self) -> _Snapshot:
        return self._env._snapshots[self.instance_id]

    @property
    def status(self) -> str:
        """The instance's status: ``running``, ``waiting`` (for an event or a child), ``complete``, ...."""
        return self._snapshot.status

    @property
    def output(self) -> JSON:
        """What the workflow returned, once complete."""
        return self._snapshot.output

    @property
    def error(self) -> dict[str, Any] | None:
        """The stored error, once errored or held (``type``, ``message``, ...)."""
        return self._snapshot.error

    @property
    def finished(self) -> bool:
        """Whether the run completed, errored or was terminated."""
        return InstanceStatus(self.status).is_finished

    @property
    def now(self) -> datetime:
        """The virtual time."""
        return self._env.now

    @property
    def runs(self) -> Counter[str]:
        """How many times each step's code (or stub) ran, by step name."""
        return self._env._step_runs[self.instance_id]

    @property
    def children(self) -> dict[str, WorkflowRun]:
        """The child workflows this run started, by instance id (``<parent id>/<name>``)."""
        return {
            child_id: self._env.run(child_id)
            for child_id in self._snapshot.children
            if child_id in self._env._snapshots
        }

    @property
    def history(self) -> list[HistoryEntry]:
        """Every step, sleep and wait so far, in the order they were planned."""
        return list(self._snapshot.history)

    def entry(self, name: str, occurrence: int = 1) -> HistoryEntry:
        """The history entry of one step (or sleep, or wait)."""
        for item in self.history:
            if (item.name, item.occurrence) == (name, occurrence):
                return item
        raise KeyError(f"no step {format_key((name, occurrence))!r} in the history")

    async def send_event(self, event_type: str, payload: object = None) -> None:
        """Deliver an event as ``Client.send_event`` would, and run on.

        Raises:
            BadPayloadError: the engine refused the event (the payload does not
                fit the waiting ``payload_type``, or the instance is finished):
                the dead-letter reason.
        """
        message = EventMessage(
            workflow=self.workflow.name,
            instance_id=self.instance_id,
            event_id=str(uuid.uuid4()),
            event_type=event_type,
            payload=self._env.payloads.seal(codec.to_payload(payload)),
        )
        await self._env._run_with(message)

    async def terminate(self, *, rollback: bool = False, children: bool = False) -> None:
        """Terminate the run as ``Client.terminate`` does, and run on (a rollback's compensations run).

        Raises:
            InvalidStateError: the run has finished.
        """
        async with self._env._session() as session:
            async with session.store.transaction() as tx:
                rows = await termination.terminate(
                    tx,
                    self.instance_id,
                    payload_limit=self._env.payload_limit,
                    rollback=rollback,
                    children=children,
                )
            await session.relay.publish_committed(rows)
        await self._env._run_until(None)

    async def advance(self, by: Duration | None = None) -> None:
        """Move virtual time on by ``by`` (default: to this run's next timer), fire what falls due, run on."""
        if by is not None:
            await self._env._run_until(self._env.now + parse_duration(by))
            return
        async with self._env._session() as session:
            due = await session.next_timer(instance_id=self.instance_id)
        if due is not None:
            await self._env._run_until(due)


class _KitBroker:
    """The environment's broker: published messages wait in memory until the environment delivers them."""

    def __init__(self) -> None:
        self.ready: deque[Delivery] = deque()
        self.dead: list[_DeadLetter] = []
        self._requeues: Counter[int] = Counter()
        self.failure: RuntimeError | None = None
        """A delivery the engine kept giving back (the store failing): the run stops with it."""

    async def publish(self, routing_key: str, body: bytes, headers: Mapping[str, str] | None) -> None:
        """Queue a message (the relay's confirmed publish)."""
        self.ready.append(self._delivery(routing_key, body, dict(headers or {})))

    async def probe(self) -> None:
        """Always there: a queue in memory."""

    def _delivery(self, routing_key: str, body: bytes, headers: dict[str, str]) -> Delivery:
        async def ack() -> None:
            return None

        async def requeue() -> None:
            self._requeues[id(delivery)] += 1
            if self._requeues[id(delivery)] > _MAX_REQUEUES:
                # Not raised here: the handler gives a delivery back quietly, so the run raises it.
                self.failure = RuntimeError(
                    f"the engine gave {routing_key!r} back {_MAX_REQUEUES} times: see its log"
                )
                return
            self.ready.append(delivery)

        delivery = Delivery(body, routing_key, headers, False, ack, requeue)
        return delivery

    async def dead_letter(self, delivery: Delivery, reason: str) -> None:
        """Keep a refused message with its reason: the environment raises it to the test."""
        try:
            message: AnyMessage | None = parse_message(delivery.body, limit=len(delivery.body) + 1)
        except BadPayloadError:
            message = None
        self.dead.append(_DeadLetter(message, reason))


class _KitExecutor(StepExecutor):
    """The worker's step executor, with stubs by step name, counting the runs of each step."""

    def __init__(self, env: WorkflowEnvironment) -> None:
        super().__init__(
            threads=4,
            default_timeout=timedelta(minutes=10),
            payload_limit=env.payload_limit,
            payloads=env.payloads,
        )
        self._env = env

    async def run(self, call: StepCall, info: RunningStep) -> StepResult:
        stub = self._env.stubs.get(info.name)
        if stub is not None:
            call = replace(call, fn=stub)
        self._env._step_runs[info.instance_id][info.name] += 1
        return await super().run(call, info)


@dataclass(frozen=True, slots=True)
class _Session:
    """The engine's parts for one call of the environment, over its store."""

    handler: MessageHandler
    relay: OutboxRelay
    store: Store

    async def next_timer(
        self, *, instance_id: str | None = None, automatic: bool = False, now: datetime | None = None
    ) -> datetime | None:
        """The next timer (of one instance; or one that moves time by itself, with the limits' next token)."""
        due = await self.store.next_timer_due(
            instance_id=instance_id, kinds=_AUTOMATIC_TIMERS if automatic else None
        )
        if automatic and now is not None:
            _, limits_s = await self.store.seconds_until_next_due()
            if limits_s is not None:
                limits_due = now + timedelta(seconds=max(limits_s, 0.001))
                due = limits_due if due is None else min(due, limits_due)
        return due

    async def fire_due_timers(self) -> bool:
        """The scheduler's work: due timers queue their messages, due limits grant; then they go out."""
        fired = await self.store.fire_due_timers(limit=1000)
        async with self.store.transaction() as tx:
            granted = await tx.sweep_limits(lease=DEFAULT_LEASE)
        await self.relay.publish_committed([timer.message() for timer in fired] + granted)
        return bool(fired or granted)


class WorkflowEnvironment:
    """Runs workflows in-process for tests, on the real engine over an embedded store, on virtual time.

    Args:
        stubs: step name -> function to run instead of the step's own (same arguments).
        start_time: where the virtual clock starts (default: now).
        payload_limit: the largest params, result or message, as ``STEPLINE_MAX_PAYLOAD_BYTES``.
        workflows: the workflows that ``ctx.child`` may start, found by name.
        codec: the payload codec a fleet would load from ``STEPLINE_CODEC``: params,
            results, outputs, events and heartbeat details are sealed with it in the
            kit's store, as in production, and the run's ``output`` and ``history``
            show them opened with it.
    """

    def __init__(
        self,
        *,
        stubs: Mapping[str, Callable[..., Any]] | None = None,
        start_time: datetime | None = None,
        payload_limit: int = 1024 * 1024,
        workflows: Iterable[Workflow[Any, Any]] = (),
        codec: PayloadCodec | None = None,
    ) -> None:
        self.stubs = dict(stubs or {})
        self.workflows = {workflow.name: workflow for workflow in workflows}
        # The store keeps time to the millisecond: so does the virtual clock, so that it lands on timers.
        start = (start_time or datetime.now(UTC)).astimezone(UTC)
        self.now = start.replace(microsecond=start.microsecond // 1000 * 1000)
        self.payload_limit = payload_limit
        self.payloads = Payloads(codec, max_bytes=payload_limit)
        """How the environment seals and opens payloads (with ``codec``, if given)."""
        self.executor = _KitExecutor(self)
        directory = Path(tempfile.mkdtemp(prefix="stepline-testing-"))
        self._database_url = f"sqlite:///{directory / 'state.db'}"
        self._cleanup = weakref.finalize(self, shutil.rmtree, directory, ignore_errors=True)
        self._migrated = False
        self._broker = _KitBroker()
        self._step_runs: defaultdict[str, Counter[str]] = defaultdict(Counter)
        self._snapshots: dict[str, _Snapshot] = {}
        self._workflow_of: dict[str, str] = {}
        self._runs: dict[str, WorkflowRun] = {}
        self._schedules_synced = False
        self._active: _Session | None = None
        """The engine's parts while the environment runs: ``sleep`` fires timers with them."""

    async def sleep(self, duration: Duration) -> None:
        """Let ``duration`` pass on the virtual clock, from a step's code (or stub): work that long.

        The heartbeats the step reported so far are written first; then the
        clock moves on and the timers that fall due meanwhile fire, as the
        scheduler fires them: a long step (``heartbeat_timeout=``) that does not
        heartbeat within its timeout loses its lease, and its code is stopped at
        the next heartbeat, as on a real worker. Their messages are delivered
        once the steps running now have committed.

        Raises:
            RuntimeError: called while the environment runs nothing (outside step code).
        """
        session = self._active
        if session is None:
            raise RuntimeError("env.sleep() lets time pass inside a running step: call it from step code")
        try:
            lease = step_info().lease
        except SteplineError:  # called from code that is no step's: nothing to write first
            lease = None
        if lease is not None:
            await lease.flush()
        self.now += parse_duration(duration)
        await session.fire_due_timers()

    async def start(
        self,
        workflow: Workflow[Any, Any],
        params: object = None,
        *,
        instance_id: str = "test",
        priority: int = 0,
    ) -> WorkflowRun:
        """Start an instance and run it until it finishes or waits for an event.

        Under a concurrency limit it may wait ``queued`` instead (``priority``, 0-9,
        orders the queued instances), or end ``terminated``, as in a real fleet.

        Raises:
            InvalidParamsError: the params do not fit the workflow, as at a real start.
            InvalidIdError: the id is empty, too long or holds a control character.
            InvalidPriorityError: ``priority`` is not an int from 0 to 9.
        """
        self.workflows.setdefault(workflow.name, workflow)
        message = StartMessage(
            workflow=workflow.name,
            instance_id=check_instance_id(instance_id),  # the producer's one-line error, not pydantic's
            params=self.payloads.seal(workflow.encode_params(params)),  # sealed as the Producer seals them
            priority=check_priority(priority, workflow.name),
        )
        await self._run_with(message)
        return self.run(instance_id)

    async def run_schedules(self, until: datetime | Duration) -> list[WorkflowRun]:
        """Fire the schedules the environment's workflows declare, on the virtual clock, until ``until``.

        ``until`` is a moment, or a duration from now. The schedules are written
        as a worker writes them when it starts (the first call), then the clock
        moves from one due schedule to the next: each firing is the scheduler's
        own, and the instances it starts run (through their sleeps, which move
        the clock too) before the next. Returns the runs started, in order;
        their ids are ``<schedule id>@<tick>``. Ticks the runs' sleeps moved the
        clock past are missed ticks, handled by ``catch_up``.
        """
        end = until if isinstance(until, datetime) else self.now + parse_duration(until)
        started: list[str] = []
        while True:
            async with self._session() as session:
                if not self._schedules_synced:
                    await sync_declared_schedules(session.store, self.workflows, self.payloads)
                    self._schedules_synced = True
                async with session.store.reading() as tx:
                    due, _ = await tx.next_schedule_due()
                if due is None or due > end:
                    break
                self.now = max(self.now, due)
                fired = await fire_due_schedules(session.store, payload_limit=self.payload_limit)
                await session.relay.publish_committed(fired.rows)
            started.extend(fired.instance_ids)
            await self._run_until(None)
        self.now = max(self.now, end)
        return [self.run(instance_id) for instance_id in started]

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[AsyncConnection]:
        """A connection to the environment's database, in a transaction committed when the block ends.

        The database ``ctx.transaction`` steps write to: create the tables they
        use before starting a run, and read what they wrote after.
        """
        async with self._session() as session, session.store.transaction() as tx:
            yield tx.connection

    def run(self, instance_id: str) -> WorkflowRun:
        """The run of an instance this environment started (a child's too)."""
        if instance_id not in self._snapshots:
            raise KeyError(f"no instance {instance_id!r} in this environment")
        run = self._runs.get(instance_id)
        if run is None:
            workflow = self.workflows[self._workflow_of[instance_id]]
            run = self._runs[instance_id] = WorkflowRun(self, workflow, instance_id)
        return run

    def close(self) -> None:
        """Release the step threads and delete the store (also done when the environment is collected)."""
        self.executor.shutdown()
        self._cleanup()

    # ------------------------------------------------------------ the engine

    async def _run_with(self, message: StartMessage | EventMessage) -> None:
        """Deliver ``message`` and run until nothing moves by itself; raise what the engine refused."""
        await self._broker.publish(
            message.routing_key, encode_message(message, limit=self.payload_limit), None
        )
        await self._run_until(None)

    async def _run_until(self, moment: datetime | None) -> None:
        """Move the clock to ``moment`` (if later), then run: deliver, fire, skip to sleeps, repeat."""
        if moment is not None:
            self.now = max(self.now, moment)
        async with self._session() as session:
            self._active = session
            try:
                while True:
                    await self._deliver_all(session.handler)
                    if await session.fire_due_timers():
                        continue
                    due = await session.next_timer(automatic=True, now=self.now)
                    if due is None:
                        break
                    if due <= self.now:  # the engine's clock and the store's disagree: a bug, not a hang
                        raise RuntimeError(f"a timer due at {due} did not fire at {self.now}")
                    self.now = due
            finally:
                self._active = None
            await self._take_snapshots(session.store)
        self._raise_dead_letters()

    async def _deliver_all(self, handler: MessageHandler) -> None:
        while self._broker.ready:
            batch = list(self._broker.ready)
            self._broker.ready.clear()
            await asyncio.gather(*(handler.handle(delivery) for delivery in batch))
            failure, self._broker.failure = self._broker.failure, None
            if failure is not None:
                raise failure

    @asynccontextmanager
    async def _session(self) -> AsyncIterator[_Session]:
        """The worker's parts over the store, for one call: nothing stays open between calls."""
        if not self._migrated:
            stores.upgrade(self._database_url)
            self._migrated = True
        store = stores.create_store(self._database_url, clock=lambda: self.now)
        relay = OutboxRelay(store, self._broker, OutboxSettings())
        handler = MessageHandler(
            store=store,
            relay=relay,
            dead_letter=self._broker.dead_letter,
            executor=self.executor,
            workflows=self.workflows,
            payload_limit=self.payload_limit,
            payloads=self.payloads,
            worker_id="testing",
            retry_delay=0.0,
            clock=lambda: self.now,
        )
        try:
            yield _Session(handler, relay, store)
        finally:
            await store.close()

    async def _take_snapshots(self, store: Store) -> None:
        snapshots: dict[str, _Snapshot] = {}
        workflows: dict[str, str] = {}
        async with store.reading() as tx:
            for row in await tx.list_instance_rows(limit=1_000_000):
                steps = await tx.get_step_rows(row.id)
                # Read as the client reads them: references read back, sealed values opened.
                output, *results = await tx.show_payloads(
                    self.payloads, [row.output, *(step.result for step in steps)]
                )
                history = [
                    HistoryEntry(
                        step.name,
                        step.occurrence,
                        step.kind,
                        step.status,
                        step.attempt,
                        result,
                        step.error,
                    )
                    for step, result in zip(steps, results, strict=True)
                ]
                children = list(
                    dict.fromkeys(  # a wait_for_child names the child its start_child started
                        str((step.detail or {}).get("child_id"))
                        for step in steps
                        if step.kind in (StepKind.CHILD, StepKind.START)
                    )
                )
                snapshots[row.id] = _Snapshot(row.status, output, row.error, history, children)
                workflows[row.id] = row.workflow
        self._snapshots, self._workflow_of = snapshots, workflows

    def _raise_dead_letters(self) -> None:
        """What the engine refused is the test's to see: as the error it would raise, or the reason."""
        dead, self._broker.dead = self._broker.dead, []
        for letter in dead:
            message = letter.message
            if (
                isinstance(message, StartMessage)
                and message.parent is not None
                and message.workflow not in self.workflows
            ):
                raise LookupError(
                    f"{message.parent.workflow!r} starts child workflow {message.workflow!r}: "
                    "pass it to WorkflowEnvironment(workflows=[...])"
                )
        if dead:
            raise BadPayloadError(dead[0].reason)


def check_replay(workflow: Workflow[Any, Any], recorded: Mapping[str, Any] | str | Path) -> None:
    """Replay a recorded history against the current code of ``workflow``.

    ``recorded`` is the output of ``stepline history ID --json`` (parsed, as
    text, or a file path). Passes silently when the code asks for exactly what
    the history holds.

    Raises:
        NonDeterminismError: the code asks for something else (a deploy would
            hold the instance); the message names both.
    """
    if isinstance(recorded, Path):
        data: Mapping[str, Any] = json.loads(recorded.read_text())
    elif isinstance(recorded, str):
        data = json.loads(recorded)
    else:
        data = recorded
    instance = data["instance"]
    if instance["workflow"] != workflow.name:
        raise ValueError(f"the history is of workflow {instance['workflow']!r}, not {workflow.name!r}")
    records: dict[StepKey, StepRecord] = {}
    for item in [*data.get("recorded_values", []), *instance["steps"]]:
        record = StepRecord(
            name=item["name"],
            occurrence=item["occurrence"],
            position=item.get("position") or len(records) + 1,
            kind=StepKind(item["kind"]),
            status=StepStatus(item["status"]),
            attempt=item.get("attempts", 1),
            result=codec.escape(item.get("result")),  # as shown; stored, a user's dict is escaped
            error=item.get("error"),
        )
        records[record.key] = record
    history = History(
        instance_id=instance["id"],
        workflow=instance["workflow"],
        status=InstanceStatus(instance["status"]),
        params=codec.escape(instance["params"]),
        version=0,
        trace_context=None,
        steps=records,
    )
    with Replay(workflow, history) as replay:
        outcome = replay.start()
    if outcome.kind == "diverged":
        assert isinstance(outcome.error, NonDeterminismError)
        raise outcome.error
