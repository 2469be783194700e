"""A long step's lease as its attempt sees it: taken before the code runs, its lapse ended as a time-out.

The lease itself and the heartbeats that renew it are ``stepline.worker.heartbeats``,
which the authoring API imports: what needs the executor or the planner is here.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

from stepline.shared.db.store import Store
from stepline.shared.errors import HeartbeatTimeoutError
from stepline.shared.failures import failure_record
from stepline.shared.history import History, StepKey, format_key
from stepline.shared.messages import StepMessage, WakeMessage
from stepline.worker.executor import StepAttemptFailed
from stepline.worker.fencing import step_key
from stepline.worker.heartbeats import StepLease
from stepline.worker.plan import Planner

log = logging.getLogger("stepline.worker")


async def take_lease(
    store: Store, planner: Planner, history: History, message: StepMessage, heartbeat_timeout: timedelta
) -> StepLease | None:
    """The attempt's lease; its lapse sends the wake-up that ends the attempt (``end_lapsed``)."""
    key = step_key(message)
    routed, body = planner.wake_message(history.workflow, history.instance_id, key, message.attempt)
    return await StepLease.take(
        store,
        history.instance_id,
        key,
        message.attempt,
        heartbeat_timeout,
        (routed, body, history.trace_context),
        planner.payloads,
    )


def lapsed_attempt(history: History, message: WakeMessage) -> tuple[StepMessage, StepAttemptFailed]:
    """The attempt whose lease fired (``message``) and its failure as timed out, logged."""
    key: StepKey = (message.step, message.occurrence)
    attempt = StepMessage(
        workflow=message.workflow,
        instance_id=message.instance_id,
        step=message.step,
        occurrence=message.occurrence,
        attempt=message.attempt,
    )
    record = history.step(key)
    detail = (record.detail if record is not None else None) or {}
    error = HeartbeatTimeoutError(format_key(key), float(detail.get("heartbeat_timeout_s") or 0))
    now = datetime.now(UTC)
    lapsed = StepAttemptFailed(failure_record(error), True, "timed_out", now, now, error)
    log.info(
        "lease lapsed: step attempt timed out",
        extra={
            "event": "lease_lapsed",
            "instance_id": message.instance_id,
            "step": format_key(key),
            "attempt": message.attempt,
        },
    )
    return attempt, lapsed
