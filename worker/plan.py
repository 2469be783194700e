"""Write what a replay decided (new entries, messages, timers, the outcome) in the caller's transaction."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from stepline.shared import codec, slots
from stepline.shared.codec import JSON, Payloads
from stepline.shared.db.records import Message, NewStep, NewTimer, OutboxRow
from stepline.shared.db.transaction import Transaction
from stepline.shared.errors import PayloadTooLargeError, PayloadUnreadableError
from stepline.shared.failures import failure_record
from stepline.shared.history import History, ParentLink, StepKey, format_key, undone_key
from stepline.shared.hooks import Hooks, NoHooks
from stepline.shared.messages import (
    AdvanceMessage,
    ParentRef,
    StartMessage,
    StepMessage,
    WakeMessage,
    encode_message,
    parent_wake,
)
from stepline.shared.rollback import ROLLBACK_WITH_PARENT
from stepline.shared.states import InstanceStatus, StepKind, StepStatus
from stepline.shared.topology import pool_of, routing_key
from stepline.worker.replay.engine import KEPT_WHEN_ENDING, NewEntry, Outcome, Replay, payload_problem
from stepline.worker.replay.rollback import BATCH, ROLLBACK_CHILD
from stepline.worker.workflow import Workflow

log = logging.getLogger("stepline.worker")


@dataclass(frozen=True, slots=True)
class Transition:
    """Everything an outcome writes, when none of it depends on a read under the instance lock."""

    new_steps: list[NewStep]
    status: InstanceStatus
    messages: list[Message]
    output: JSON = None
    error: JSON = None


def real_clock() -> datetime:
    """The time now, in UTC: what ``ctx.now()`` records outside the testing kit."""
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class Planner:
    """Turns replay outcomes into rows; knows the payload limit and codec, who to tell, and the clock.

    ``clock`` is what ``ctx.now()`` records: the real time, or the testing kit's virtual time.
    """

    payload_limit: int
    hooks: Hooks = field(default_factory=NoHooks)
    clock: Callable[[], datetime] = field(default=real_clock)
    payloads: Payloads = field(default_factory=Payloads)
    """Seals what the instance writes (outputs, children's params); its replays open what they read."""

    def replay(
        self,
        workflow: Workflow[Any, Any],
        history: History,
        *,
        carried_values: Mapping[StepKey, JSON] | None = None,
    ) -> Replay:
        """A replay of ``history`` on this planner's clock."""
        return Replay(
            workflow, history, carried_values=carried_values, clock=self.clock, payloads=self.payloads
        )

    # ------------------------------------------------------------ messages

    def step_message(self, history: History, key: StepKey, attempt: int, *, detail: JSON = None) -> Message:
        """The message that runs ``attempt`` of a step, routed to the step's worker pool.

        The pool is read from the step's ``detail``: the new entry's when given,
        else the recorded row's in ``history``. A retry, a resume or a restart
        sends it where the first attempt went, whatever the code says now.
        """
        if detail is None:
            record = history.step(key)
            detail = record.detail if record is not None else None
        message = StepMessage(
            workflow=history.workflow,
            instance_id=history.instance_id,
            step=key[0],
            occurrence=key[1],
            attempt=attempt,
        )
        routed = routing_key("step", history.workflow, pool_of(detail))
        return routed, self._encode(message), history.trace_context

    def wake_message(
        self, workflow: str, instance_id: str, key: StepKey, attempt: int = 1
    ) -> tuple[str, bytes]:
        """The message that settles a waiting entry (a sleep, an event time-out, a child), or a lease."""
        message = WakeMessage(
            workflow=workflow, instance_id=instance_id, step=key[0], occurrence=key[1], attempt=attempt
        )
        return message.routing_key, self._encode(message)

    def _encode(self, message: StepMessage | WakeMessage | StartMessage | AdvanceMessage) -> bytes:
        return encode_message(message, limit=self.payload_limit)

    # ------------------------------------------------------------ applying

    def plan_unlocked(self, history: History, replay: Replay, outcome: Outcome) -> Transition | None:
        """What ``apply`` would write for ``outcome``, if that needs no read under the lock; else None.

        New steps, recorded values, child starts and a returned output qualify.
        Sleeps (their timers take the fire time the database gives the entry),
        event waits (which may take a stored event), errors and paused instances
        go through ``apply``; so does the end of an instance under a concurrency
        limit, whose freed slot is handed on under the key's lock (``_finish``).
        """
        if outcome.kind not in ("blocked", "returned") or history.status == InstanceStatus.PAUSED:
            return None
        if outcome.kind == "returned" and history.concurrency_key is not None:
            return None
        entries = replay.new_entries
        if any(entry.kind in (StepKind.SLEEP, StepKind.EVENT) for entry in entries):
            return None
        if any(self._child_params_apart(entry) for entry in entries):
            return None  # their payload rows are written in the transaction (``_store_child_params``)
        new_steps = _new_steps(history, entries, {})
        if outcome.kind == "returned":
            status, output, error = self._ending(outcome)
            started = self._detached_starts(history, entries)
            return Transition(new_steps, status, started + self.parent_wake(history.parent), output, error)
        status = InstanceStatus.RUNNING if outcome.is_running else InstanceStatus.WAITING
        return Transition(new_steps, status, self._blocked_sends(history, entries))

    def plan_start(
        self, history: History, replay: Replay, outcome: Outcome
    ) -> tuple[Transition, list[NewTimer]] | None:
        """What a new instance's first replay writes, for a batch of starts; None if it needs ``apply``.

        ``plan_unlocked``'s cases, and sleeps too: a new instance has no stored
        events or other history to read, and the batch's statement gives each
        sleep's timer the fire time its entry row gets (``stepline.shared.db.batch_starts``).
        """
        if not _blocks_on_new_sleeps(replay, outcome):
            transition = self.plan_unlocked(history, replay, outcome)
            return None if transition is None else (transition, [])
        return self.plan_sleeps(history, replay, outcome)

    def plan_sleeps(
        self, history: History, replay: Replay, outcome: Outcome
    ) -> tuple[Transition, list[NewTimer]] | None:
        """What a replay blocked on new sleeps writes, and their timers; None if ``apply`` reads more first.

        None for anything else ``plan_unlocked`` leaves to ``apply``: a new event
        wait (it may take a stored event), a paused instance, a child's params
        stored apart. What ``apply`` writes under the lock for such a replay is
        exactly this, the timers' fire times given by the entries' rows: a caller
        that committed it there may keep the replay (``StepRunner.keep_armed``).
        """
        entries = replay.new_entries
        if not _blocks_on_new_sleeps(replay, outcome):
            return None
        if history.status == InstanceStatus.PAUSED or any(entry.kind == StepKind.EVENT for entry in entries):
            return None
        if any(self._child_params_apart(entry) for entry in entries):
            return None
        status = InstanceStatus.RUNNING if outcome.is_running else InstanceStatus.WAITING
        sleeps = [
            self._wake_timer(history, entry.key, "sleep") for entry in entries if entry.kind == StepKind.SLEEP
        ]
        return Transition(
            _new_steps(history, entries, {}), status, self._blocked_sends(history, entries)
        ), sleeps

    def _blocked_sends(self, history: History, entries: list[NewEntry]) -> list[Message]:
        """The messages of a blocked replay's new steps and children (``plan_unlocked``, ``plan_start``)."""
        return [
            self.step_message(history, entry.key, 1, detail=entry.detail)
            if entry.kind == StepKind.STEP
            else self._child_message(history, entry)
            for entry in entries
            if entry.kind in _CHILD_KINDS or entry.kind == StepKind.STEP
        ]

    def report_finished(self, history: History, outcome: Outcome, status: InstanceStatus) -> None:
        """Tell the hooks an instance ended (once its transaction has the final status)."""
        self.hooks.instance_finished(
            history.workflow,
            history.instance_id,
            history.trace_context,
            status,
            history.created_at,
            outcome.error if status == InstanceStatus.ERRORED else None,
        )

    async def apply(
        self, tx: Transaction, history: History, replay: Replay, outcome: Outcome
    ) -> list[OutboxRow]:
        """Record the replay's new entries and outcome; returns the outbox rows to publish."""
        outcome, matched = await self._hand_stored_events(tx, history, replay, outcome)
        if outcome.kind == "raised" and isinstance(outcome.error, PayloadUnreadableError):
            # A key not deployed yet, or a payload row gone: nothing is lost by holding the
            # instance, and `resume` goes on once the payload can be read.
            return await self.hold(tx, history, outcome.error)
        entries = replay.new_entries
        if outcome.kind in ("blocked", "returned"):  # the only outcomes that start children
            entries = await self._store_child_params(tx, entries)
        if outcome.kind == "blocked":
            return await self._record_blocked(tx, history, entries, outcome, matched)
        return await self._finish(tx, history, entries, outcome, matched)

    def _child_params_apart(self, entry: NewEntry) -> bool:
        """Whether ``entry`` starts a child whose params are too large for its start message."""
        return (
            entry.kind in _CHILD_KINDS
            and entry.child_params is not None
            and self.payloads.is_large(entry.child_params)
        )

    async def _store_child_params(self, tx: Transaction, entries: list[NewEntry]) -> list[NewEntry]:
        """``entries`` with each child's params over ``offload_above`` stored apart, as the child's.

        Written in the transaction that records the parent's new entries, so the
        child's start message, queued in the same commit, carries only the reference.
        """
        if not any(self._child_params_apart(entry) for entry in entries):
            return entries
        stored = []
        for entry in entries:
            if self._child_params_apart(entry):
                name = format_key(entry.key)
                carried, row = self.payloads.offload(entry.child_params, what=f"the params of child {name!r}")
                if row is not None:
                    await tx.insert_payload((entry.detail or {})["child_id"], row)
                    entry = replace(entry, child_params=carried)
            stored.append(entry)
        return stored

    async def _hand_stored_events(
        self, tx: Transaction, history: History, replay: Replay, outcome: Outcome
    ) -> tuple[Outcome, dict[StepKey, JSON]]:
        """A new wait takes an event sent before it, at once; the replay then runs on."""
        matched: dict[StepKey, JSON] = {}
        checked: set[StepKey] = set()
        while outcome.kind == "blocked":
            waits = [
                entry
                for entry in replay.new_entries
                if entry.kind == StepKind.EVENT and entry.key not in checked
            ]
            if not waits:
                break
            entry = waits[0]
            claimed = await tx.claim_event(history.instance_id, _event_type(entry.detail), entry.key)
            if claimed is None:
                checked.add(entry.key)
                continue
            # A payload stored apart is read back; the rows keep the reference.
            payload = await tx.read_payload(claimed.payload)
            if payload_problem(replay, entry.key, payload) is not None:
                # Kept before the wait existed, and it does not fit: set it aside, try the next one.
                await tx.reject_event(claimed.id)
            else:
                checked.add(entry.key)
                matched[entry.key] = claimed.payload
                outcome = replay.resolve(entry.key, payload)
        return outcome, matched

    async def _record_blocked(
        self,
        tx: Transaction,
        history: History,
        entries: list[NewEntry],
        outcome: Outcome,
        matched: dict[StepKey, JSON],
    ) -> list[OutboxRow]:
        """Record what a blocked replay waits on: steps go out as messages, sleeps and time-outs as timers."""
        new_steps = _new_steps(history, entries, matched)
        # A sleep's timer fires when its entry says: only then are the entries inserted on their own.
        fire_times: dict[StepKey, Any] = {}
        if any(entry.kind == StepKind.SLEEP for entry in entries):
            fire_times = await tx.insert_steps(history.instance_id, new_steps)
            new_steps = []
        paused = history.status == InstanceStatus.PAUSED
        messages, timers = self._sends(history, entries, matched, fire_times, paused=paused)
        await tx.insert_timers(history.instance_id, timers)
        if paused:
            status = InstanceStatus.PAUSED  # a resume sends what it holds back
        else:
            status = InstanceStatus.RUNNING if outcome.is_running else InstanceStatus.WAITING
        return await tx.write_transition(
            history.instance_id, new_steps=new_steps, status=status, messages=messages
        )

    def _sends(
        self,
        history: History,
        entries: list[NewEntry],
        matched: dict[StepKey, JSON],
        fire_times: dict[StepKey, Any],
        *,
        paused: bool,
    ) -> tuple[list[Message], list[NewTimer]]:
        """The messages new entries send (steps, child starts) and the timers they arm (sleeps, time-outs).

        A paused instance holds its new steps back; an event wait that took a
        stored event needs no time-out.
        """
        messages: list[Message] = []
        timers: list[NewTimer] = []
        for entry in entries:
            if entry.kind == StepKind.STEP and not paused:
                messages.append(self.step_message(history, entry.key, 1, detail=entry.detail))
            elif entry.kind == StepKind.SLEEP:
                fire_at = fire_times[entry.key]
                assert fire_at is not None
                timers.append(self._wake_timer(history, entry.key, "sleep", fire_at=fire_at))
            elif entry.kind == StepKind.EVENT and entry.key not in matched and entry.timeout is not None:
                timers.append(self._wake_timer(history, entry.key, "event-timeout", entry=entry))
            elif entry.kind in _CHILD_KINDS:
                messages.append(self._child_message(history, entry))
        return messages, timers

    async def _finish(
        self,
        tx: Transaction,
        history: History,
        entries: list[NewEntry],
        outcome: Outcome,
        matched: dict[StepKey, JSON],
    ) -> list[OutboxRow]:
        """Record a replay that returned or failed: its last entries, its end, its parent's wake-up.

        A replay that diverged does not end the instance: it is held (see ``hold``).
        """
        if outcome.kind == "diverged":
            assert outcome.error is not None
            return await self.hold(tx, history, outcome.error)
        if outcome.kind == "raised":
            # Only recorded values and patch markers are kept; nothing new starts after an error.
            entries = [entry for entry in entries if entry.kind in KEPT_WHEN_ENDING]
        instance_id = history.instance_id
        status, output, error = self._ending(outcome)
        await tx.cancel_timers(instance_id)
        started = self._detached_starts(history, entries)
        rows = await tx.write_transition(
            instance_id,
            new_steps=_new_steps(history, entries, matched),
            status=status,
            output=output,
            error=error,
            messages=started + self.parent_wake(history.parent),
        )
        if history.concurrency_key is not None:
            # Its slot frees in the transaction that ends it; the next queued instance starts.
            rows += await slots.release(
                tx, history.workflow, history.concurrency_key, payload_limit=self.payload_limit
            )
        self.report_finished(history, outcome, status)
        return rows

    async def hold(self, tx: Transaction, history: History, error: BaseException) -> list[OutboxRow]:
        """Hold an instance whose replay diverged from its history: paused, ``error`` naming both sides.

        The one rule for every divergence, wherever a replay finds it. Nothing is
        lost: the history, the timers and the outbox stay as they are, nothing the
        diverging code asked for is written, and the parent is not woken (a held
        instance has not finished). A ``resume`` after a deploy that fixes the code
        replays the stored history again; still diverging, it is held again.
        """
        stored = instance_error(error)
        await tx.update_instance(history.instance_id, status=InstanceStatus.PAUSED, error=stored)
        self.hooks.instance_held(history.workflow, history.instance_id, history.trace_context, error)
        log.warning(
            "instance held: %s",
            error,
            extra={"event": "instance_held", "instance_id": history.instance_id},
        )
        return []

    def _ending(self, outcome: Outcome) -> tuple[InstanceStatus, JSON, JSON]:
        """The final status, output and error of a returned or failed replay."""
        if outcome.kind == "returned":
            try:
                codec.encode(outcome.output, limit=self.payload_limit, what="the workflow's output")
            except PayloadTooLargeError as exc:
                return InstanceStatus.ERRORED, None, instance_error(exc)
            return InstanceStatus.COMPLETE, self.payloads.seal(codec.scrub_nul(outcome.output)), None
        assert outcome.error is not None
        error = instance_error(outcome.error)
        if outcome.compensation_failures:
            # The original error stays the instance's error; the failed compensations come with it.
            error["compensation_failures"] = list(outcome.compensation_failures)
        status = InstanceStatus.TERMINATED if outcome.terminated else InstanceStatus.ERRORED
        return status, None, error

    def parent_wake(self, parent: ParentLink | None) -> list[Message]:
        """The message telling a parent step that its child finished (none without a parent)."""
        if parent is None:
            return []
        message = parent_wake(parent)
        return [(message.routing_key, self._encode(message), None)]

    def _wake_timer(
        self,
        history: History,
        key: StepKey,
        kind: str,
        *,
        fire_at: Any = None,
        entry: NewEntry | None = None,
    ) -> NewTimer:
        routing_key, body = self.wake_message(history.workflow, history.instance_id, key)
        delay = entry.timeout if entry is not None else None
        return NewTimer(key, 1, kind, routing_key, body, history.trace_context, fire_at=fire_at, delay=delay)

    def _detached_starts(self, history: History, entries: list[NewEntry]) -> list[Message]:
        """The starts of the detached children an ending replay asked for."""
        return [self._child_start(history, entry) for entry in entries if entry.kind == StepKind.START]

    def _child_message(self, history: History, entry: NewEntry) -> Message:
        """What a child entry sends: the child's start, or for a ``wait_for_child`` a wake-up of itself.

        A detached child reports its end to its ``start_child`` entry, which passes it
        on to the waits for it (``waits.settle_wake``); the wait's own wake-up settles
        it at once if the child has already finished. A rollback's ``$undo:<child>``
        asks the completed child to roll back.
        """
        detail = entry.detail or {}
        if entry.kind == StepKind.CHILD and detail.get(ROLLBACK_CHILD):
            # A completed child rolls back with its parent: its end wakes the parent's entry.
            # The asking step rides along: an instance that is not its child is left alone.
            name, occurrence = undone_key(entry.key)
            asker = ParentRef(
                instance_id=history.instance_id, workflow=history.workflow, step=name, occurrence=occurrence
            )
            message = AdvanceMessage(
                workflow=detail["workflow"],
                instance_id=detail["child_id"],
                reason=ROLLBACK_WITH_PARENT,
                parent=asker,
            )
            return message.routing_key, self._encode(message), history.trace_context
        if entry.kind == StepKind.CHILD and detail.get("detached"):
            routed, body = self.wake_message(history.workflow, history.instance_id, entry.key)
            return routed, body, history.trace_context
        return self._child_start(history, entry)

    def _child_start(self, history: History, entry: NewEntry) -> Message:
        detail = entry.detail or {}
        message = StartMessage(
            workflow=detail["workflow"],
            instance_id=detail["child_id"],
            params=self.payloads.seal(entry.child_params),
            parent=ParentRef(
                instance_id=history.instance_id,
                workflow=history.workflow,
                step=entry.key[0],
                occurrence=entry.key[1],
            ),
        )
        return message.routing_key, self._encode(message), history.trace_context


def _event_type(detail: JSON) -> str:
    return str((detail or {}).get("event_type", ""))


_INITIAL_STATUS = {
    StepKind.STEP: StepStatus.RUNNING,
    StepKind.CHILD: StepStatus.RUNNING,
    StepKind.SLEEP: StepStatus.WAITING,
    StepKind.EVENT: StepStatus.WAITING,
    StepKind.VALUE: StepStatus.SUCCEEDED,
    StepKind.PATCH: StepStatus.SUCCEEDED,
    StepKind.ROLLBACK: StepStatus.SUCCEEDED,
    StepKind.START: StepStatus.SUCCEEDED,
}

_CHILD_KINDS = (StepKind.CHILD, StepKind.START)
"""The entries that send a child's start (or, waiting for a detached child, a wake-up)."""


def _new_steps(history: History, entries: list[NewEntry], matched: dict[StepKey, JSON]) -> list[NewStep]:
    """The rows of new entries, placed after the history's; an event wait in ``matched`` took its event.

    Steps planned together (parallel steps) are marked with the position of the
    first of them (``detail["batch"]``): a rollback compensates them together.
    """
    first = history.next_position
    parallel = [index for index, entry in enumerate(entries) if entry.kind == StepKind.STEP]
    batch = first + parallel[0] if len(parallel) > 1 else None
    in_batch = set(parallel)
    return [
        _new_step(entry, first + index, matched, batch=batch if index in in_batch else None)
        for index, entry in enumerate(entries)
    ]


def _new_step(
    entry: NewEntry, position: int, matched: dict[StepKey, JSON], *, batch: int | None = None
) -> NewStep:
    status, result = _INITIAL_STATUS[entry.kind], entry.result
    detail = entry.detail
    if batch is not None:
        detail = {**(detail or {}), BATCH: batch}
    if entry.key in matched:
        status, result = StepStatus.SUCCEEDED, matched[entry.key]
    return NewStep(
        key=entry.key,
        position=position,
        kind=entry.kind,
        status=status,
        result=codec.scrub_nul(result),
        fire_at=entry.fire_at,
        delay=entry.delay,
        detail=detail,
    )


def instance_error(error: BaseException) -> dict[str, Any]:
    """How an instance's error is stored: a failed step names itself (see stepline.shared.failures)."""
    return failure_record(error)


def _blocks_on_new_sleeps(replay: Replay, outcome: Outcome) -> bool:
    """Whether the replay is blocked and its new entries hold a sleep (``plan_start``, ``plan_sleeps``)."""
    return outcome.kind == "blocked" and any(entry.kind == StepKind.SLEEP for entry in replay.new_entries)
