"""Handle one message: start an instance, run a step attempt, or wake a sleep; commit, then ack."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from shared.broker import Delivery
from shared.db import queries
from shared.db.queries import NewTimer, OutboxRow
from shared.errors import (
    BadPayloadError,
    BrokerError,
    InvalidParamsError,
    NonDeterminismError,
    UnknownWorkflowError,
)
from shared.history import History, StepKey, format_key
from shared.messages import StartMessage, StepMessage, WakeMessage, parse_message
from shared.outbox import OutboxRelay
from shared.states import InstanceStatus, StepKind, StepStatus
from shared.telemetry import trace_headers
from worker.executor import StepAttemptFailed, StepExecutor, StepResult, StepSucceeded
from worker.plan import Planner, instance_error
from worker.replay.engine import Replay, error_info, step_failed_error
from worker.retry import DEFAULT_RETRY_POLICY
from worker.step_info import StepInfo
from worker.workflow import Workflow

log = logging.getLogger("stepline.worker")

DeadLetter = Callable[[Delivery, str], Awaitable[None]]

# Errors of the database or the broker: the message is given back and retried later.
INFRASTRUCTURE_ERRORS = (SQLAlchemyError, BrokerError, OSError)


class MessageHandler:
    """The worker's engine: one method per message kind, each ending in one transaction.

    Every handler follows the same rule: do the work, commit in one transaction
    that first locks the instance row and checks the message is still current,
    and only then ack. A message that is stale or a duplicate is acked and
    dropped; a message that cannot be understood is dead-lettered with its reason.
    """

    def __init__(
        self,
        *,
        engine: AsyncEngine,
        relay: OutboxRelay,
        dead_letter: DeadLetter,
        executor: StepExecutor,
        workflows: Mapping[str, Workflow[Any, Any]],
        payload_limit: int,
        worker_id: str,
        retry_delay: float = 1.0,
    ) -> None:
        self._engine = engine
        self._relay = relay
        self._dead_letter = dead_letter
        self._executor = executor
        self._workflows = workflows
        self._payload_limit = payload_limit
        self._planner = Planner(payload_limit)
        self._worker_id = worker_id
        self._retry_delay = retry_delay

    async def handle(self, delivery: Delivery) -> None:
        """Process one delivery to the end: acked, dead-lettered, or given back."""
        try:
            rows = await self._dispatch(delivery)
        except BadPayloadError as exc:
            await self._reject(delivery, exc.reason)
            return
        except INFRASTRUCTURE_ERRORS as exc:
            log.warning(
                "message handling failed, giving it back: %s",
                _brief(exc),
                extra={"event": "handle_failed", "routing_key": delivery.routing_key},
            )
            await asyncio.sleep(self._retry_delay)
            await _quietly(delivery.requeue())
            return
        except Exception as exc:  # process edge: record, dead-letter, keep consuming
            log.exception("internal error handling a message", extra={"event": "handle_crashed"})
            await self._reject(delivery, f"internal error: {type(exc).__name__}: {exc}")
            return
        # Ack only after the commit: a crash before this line redelivers the
        # message, and the attempt check turns the redelivery into a no-op.
        await _quietly(delivery.ack())
        try:
            await self._relay.publish_committed(rows)
        except Exception:  # the rows are committed: the sweeper publishes them
            log.exception("fast-path publish failed", extra={"event": "fast_path_failed"})

    async def _reject(self, delivery: Delivery, reason: str) -> None:
        log.warning(
            "dead-lettering message: %s",
            reason,
            extra={"event": "dead_lettered", "routing_key": delivery.routing_key},
        )
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

    async def _dispatch(self, delivery: Delivery) -> list[OutboxRow]:
        message = parse_message(delivery.body, limit=self._payload_limit)
        workflow = self._workflows.get(message.workflow)
        if workflow is None:
            raise UnknownWorkflowError(message.workflow, list(self._workflows))
        if isinstance(message, StartMessage):
            return await self._start(workflow, message, delivery.headers)
        if isinstance(message, StepMessage):
            return await self._run_step(workflow, message)
        return await self._wake(workflow, message)

    # ------------------------------------------------------------------ start

    async def _start(
        self, workflow: Workflow[Any, Any], message: StartMessage, headers: dict[str, str]
    ) -> list[OutboxRow]:
        try:
            workflow.validate_params(message.params)
        except InvalidParamsError as exc:
            raise BadPayloadError(exc.reason) from None
        async with self._engine.begin() as conn:
            trace_context = trace_headers(headers)
            created = await queries.insert_instance(
                conn,
                instance_id=message.instance_id,
                workflow=workflow.name,
                params=message.params,
                trace_context=trace_context,
            )
            if not created:
                log.info(
                    "instance exists; duplicate start ignored",
                    extra={"event": "duplicate_start", "instance_id": message.instance_id},
                )
                return []
            history = History(
                instance_id=message.instance_id,
                workflow=workflow.name,
                status=InstanceStatus.RUNNING,
                params=message.params,
                version=0,
                trace_context=trace_context,
            )
            replay = Replay(workflow, history)
            try:
                rows = await self._planner.apply(conn, history, replay, replay.start())
            finally:
                replay.close()
        log.info("instance started", extra={"event": "instance_started", "instance_id": message.instance_id})
        return rows

    # ------------------------------------------------------------------ step

    async def _run_step(self, workflow: Workflow[Any, Any], message: StepMessage) -> list[OutboxRow]:
        key: StepKey = (message.step, message.occurrence)
        async with self._engine.connect() as conn:
            history = await queries.load_history(conn, message.instance_id)
        if history is None or not self._is_current(history, key, message.attempt, message):
            return []
        replay = Replay(workflow, history)
        try:
            outcome = replay.start()
            call = replay.calls.get(key)
            if outcome.kind == "diverged" or call is None:
                return await self._commit_error(history, outcome.error or _missing(history, key))
            info = StepInfo(history.instance_id, workflow.name, key[0], key[1], message.attempt)
            result = await self._executor.run(call, info)
            log.info(
                "step attempt %s",
                "succeeded" if isinstance(result, StepSucceeded) else result.outcome,
                extra={
                    "event": "step_attempt_finished",
                    "instance_id": history.instance_id,
                    "step": format_key(key),
                    "attempt": message.attempt,
                },
            )
            async with self._engine.begin() as conn:
                lock = await queries.lock_instance(conn, history.instance_id)
                if lock is None or lock.status.is_finished:
                    return []
                if lock.version != history.version:
                    # Another step of this instance committed meanwhile: replay its newer history.
                    fresh = await queries.load_history(conn, history.instance_id)
                    assert fresh is not None
                    if not self._is_current(fresh, key, message.attempt, message):
                        return []
                    values = replay.values
                    replay.close()
                    history, replay = fresh, Replay(workflow, fresh, carried_values=values)
                    outcome = replay.start()
                    if outcome.kind == "diverged" or key not in replay.calls:
                        await queries.update_instance(
                            conn,
                            history.instance_id,
                            status=InstanceStatus.ERRORED,
                            error=instance_error(outcome.error or _missing(history, key)),
                        )
                        return []
                return await self._commit_attempt(conn, history, replay, key, message.attempt, result)
        finally:
            replay.close()

    async def _commit_attempt(
        self,
        conn: AsyncConnection,
        history: History,
        replay: Replay,
        key: StepKey,
        attempt: int,
        result: StepResult,
    ) -> list[OutboxRow]:
        instance_id = history.instance_id
        outcome_name = "succeeded" if isinstance(result, StepSucceeded) else result.outcome
        error = result.error if isinstance(result, StepAttemptFailed) else None
        await queries.insert_attempt(
            conn,
            instance_id,
            key,
            attempt=attempt,
            worker=self._worker_id,
            outcome=outcome_name,
            error=error,
            started_at=result.started_at,
            finished_at=result.finished_at,
        )
        if isinstance(result, StepSucceeded):
            await queries.settle_step(
                conn,
                instance_id,
                key,
                status=StepStatus.SUCCEEDED,
                result=result.result,
                started_at=result.started_at,
            )
            return await self._planner.apply(conn, history, replay, replay.resolve(key, result.result))
        policy = replay.calls[key].retry or DEFAULT_RETRY_POLICY
        if result.is_retryable and policy.allows_retry_after(attempt):
            await queries.settle_step(
                conn,
                instance_id,
                key,
                status=StepStatus.RETRYING,
                error=result.error,
                attempt=attempt + 1,
                started_at=result.started_at,
            )
            routing_key, body = self._planner.step_message(history, key, attempt + 1)
            timer = NewTimer(
                key,
                attempt + 1,
                "retry",
                routing_key,
                body,
                history.trace_context,
                delay=policy.delay_after(attempt),
            )
            await queries.insert_timers(conn, instance_id, [timer])
            await queries.update_instance(conn, instance_id, status=InstanceStatus.RUNNING)
            return []
        await queries.settle_step(
            conn, instance_id, key, status=StepStatus.FAILED, error=result.error, started_at=result.started_at
        )
        outcome = replay.fail(key, step_failed_error(key, attempt, result.error))
        return await self._planner.apply(conn, history, replay, outcome)

    # ------------------------------------------------------------------ wake

    async def _wake(self, workflow: Workflow[Any, Any], message: WakeMessage) -> list[OutboxRow]:
        key: StepKey = (message.step, message.occurrence)
        async with self._engine.begin() as conn:
            lock = await queries.lock_instance(conn, message.instance_id)
            if lock is None or lock.status.is_finished:
                return []
            history = await queries.load_history(conn, message.instance_id)
            assert history is not None
            record = history.step(key)
            if record is None or record.kind != StepKind.SLEEP or record.status != StepStatus.WAITING:
                _log_stale(message, "the sleep is not waiting")
                return []
            await queries.settle_step(conn, history.instance_id, key, status=StepStatus.SUCCEEDED)
            replay = Replay(workflow, history)
            try:
                outcome = replay.start()
                if replay.is_pending(key):
                    outcome = replay.resolve(key, None)
                return await self._planner.apply(conn, history, replay, outcome)
            finally:
                replay.close()

    # ------------------------------------------------------------------ helpers

    def _is_current(self, history: History, key: StepKey, attempt: int, message: StepMessage) -> bool:
        """Only the current attempt of a running step may run and commit (the fencing token)."""
        if history.status.is_finished:
            _log_stale(message, f"the instance is {history.status}")
            return False
        record = history.step(key)
        if record is None or record.kind != StepKind.STEP:
            _log_stale(message, "the history has no such step")
            return False
        if record.status not in (StepStatus.RUNNING, StepStatus.RETRYING) or record.attempt != attempt:
            _log_stale(message, f"the step is {record.status} at attempt {record.attempt}")
            return False
        return True

    async def _commit_error(self, history: History, error: BaseException) -> list[OutboxRow]:
        async with self._engine.begin() as conn:
            lock = await queries.lock_instance(conn, history.instance_id)
            if lock is None or lock.status.is_finished:
                return []
            await queries.update_instance(
                conn, history.instance_id, status=InstanceStatus.ERRORED, error=instance_error(error)
            )
        log.warning(
            "instance errored: %s",
            error,
            extra={"event": "instance_errored", "instance_id": history.instance_id},
        )
        return []


def _missing(history: History, key: StepKey) -> BaseException:
    return NonDeterminismError(history.instance_id, f"step {format_key(key)!r}", "nothing in its place")


def _log_stale(message: StepMessage | WakeMessage, why: str) -> None:
    log.info(
        "stale or duplicate message dropped: %s",
        why,
        extra={
            "event": "stale_message",
            "instance_id": message.instance_id,
            "step": format_key((message.step, message.occurrence)),
            "attempt": message.attempt,
        },
    )


def _brief(exc: BaseException) -> str:
    if isinstance(exc, DBAPIError):
        return f"{type(exc.orig).__name__}: {str(exc.orig).splitlines()[0] if str(exc.orig) else ''}"
    return f"{type(exc).__name__}: {exc}"


async def _quietly(action: Awaitable[None]) -> None:
    """Ack or requeue; if the channel is gone the broker redelivers, which is safe."""
    try:
        await action
    except Exception:  # a lost channel means redelivery, which fencing makes harmless
        log.debug("ack/requeue failed; the message will be redelivered", extra={"event": "ack_failed"})


__all__ = ["INFRASTRUCTURE_ERRORS", "MessageHandler", "error_info"]
