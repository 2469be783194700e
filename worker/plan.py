"""Write what a replay decided (new steps, sleeps, the outcome) in the caller's transaction."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection

from shared import codec
from shared.db import queries
from shared.db.queries import NewStep, NewTimer, OutboxRow
from shared.errors import PayloadTooLargeError, StepFailedError
from shared.history import History, StepKey
from shared.messages import StepMessage, WakeMessage, encode_message
from shared.states import InstanceStatus, StepKind, StepStatus
from worker.replay.engine import NewEntry, Outcome, Replay, error_info


@dataclass(frozen=True, slots=True)
class Planner:
    """Turns replay outcomes into rows; knows the payload limit."""

    payload_limit: int

    def step_message(self, history: History, key: StepKey, attempt: int) -> tuple[str, bytes]:
        """Routing key and body of the message that runs ``attempt`` of a step."""
        message = StepMessage(
            workflow=history.workflow,
            instance_id=history.instance_id,
            step=key[0],
            occurrence=key[1],
            attempt=attempt,
        )
        return message.routing_key, encode_message(message, limit=self.payload_limit)

    def wake_message(self, history: History, key: StepKey) -> tuple[str, bytes]:
        """Routing key and body of the message a sleep's timer sends."""
        message = WakeMessage(
            workflow=history.workflow,
            instance_id=history.instance_id,
            step=key[0],
            occurrence=key[1],
            attempt=1,
        )
        return message.routing_key, encode_message(message, limit=self.payload_limit)

    async def apply(
        self, conn: AsyncConnection, history: History, replay: Replay, outcome: Outcome
    ) -> list[OutboxRow]:
        """Record the replay's new entries and outcome; returns the outbox rows to publish."""
        instance_id = history.instance_id
        entries = replay.new_entries
        if outcome.kind in ("diverged", "raised"):
            # Only recorded values are kept; nothing new starts after an error.
            entries = [entry for entry in entries if entry.kind == StepKind.VALUE]
        fire_times = await queries.insert_steps(
            conn,
            instance_id,
            [self._new_step(entry, history.next_position + index) for index, entry in enumerate(entries)],
        )
        if outcome.kind == "returned":
            try:
                codec.encode(outcome.output, limit=self.payload_limit, what="the workflow's output")
            except PayloadTooLargeError as exc:
                await queries.update_instance(
                    conn, instance_id, status=InstanceStatus.ERRORED, error=instance_error(exc)
                )
                return []
            output = codec.scrub_nul(outcome.output)
            await queries.update_instance(conn, instance_id, status=InstanceStatus.COMPLETE, output=output)
            return []
        if outcome.kind in ("diverged", "raised"):
            assert outcome.error is not None
            await queries.update_instance(
                conn, instance_id, status=InstanceStatus.ERRORED, error=instance_error(outcome.error)
            )
            return []
        messages = []
        timers = []
        for entry in entries:
            if entry.kind == StepKind.STEP:
                routing_key, body = self.step_message(history, entry.key, 1)
                messages.append((routing_key, body, history.trace_context))
            elif entry.kind == StepKind.SLEEP:
                routing_key, body = self.wake_message(history, entry.key)
                fire_at = fire_times[entry.key]
                assert fire_at is not None
                timers.append(
                    NewTimer(entry.key, 1, "sleep", routing_key, body, history.trace_context, fire_at=fire_at)
                )
        await queries.insert_timers(conn, instance_id, timers)
        status = InstanceStatus.RUNNING if outcome.is_running else InstanceStatus.WAITING
        await queries.update_instance(conn, instance_id, status=status)
        return await queries.insert_outbox(conn, messages)

    @staticmethod
    def _new_step(entry: NewEntry, position: int) -> NewStep:
        if entry.kind == StepKind.VALUE:
            status = StepStatus.SUCCEEDED
        elif entry.kind == StepKind.SLEEP:
            status = StepStatus.WAITING
        else:
            status = StepStatus.RUNNING
        return NewStep(
            key=entry.key,
            position=position,
            kind=entry.kind,
            status=status,
            result=codec.scrub_nul(entry.result),
            fire_at=entry.fire_at,
            delay=entry.delay,
        )


def instance_error(error: BaseException) -> dict[str, Any]:
    """How an instance's error is stored: a failed step names itself."""
    step = error.step if isinstance(error, StepFailedError) else None
    info: dict[str, Any] = codec.scrub_nul(error_info(error, step=step))
    return info
