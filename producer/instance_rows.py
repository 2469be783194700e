"""Rows of instances and steps as a client shows them: ``InstanceInfo`` and ``StepInfo``.

The one mapping of both readers of an instance: ``Client.get`` (through the store) and
``stepline status`` on PostgreSQL (``stepline.shared.db.plain_read``, without SQLAlchemy),
so this module imports neither the store nor SQLAlchemy.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from stepline.producer.models import InstanceInfo, StepInfo
from stepline.shared.db.records import WAITING_FOR
from stepline.shared.states import InstanceStatus, StepKind
from stepline.shared.topology import pool_of


def payload_values(row: Any, step_rows: Sequence[Any]) -> list[Any]:
    """The stored payloads of an instance row and its step rows, in the order ``with_shown`` takes them."""
    return [row.params, row.output, *(value for step in step_rows for value in (step.result, step.heartbeat))]


def with_shown(row: Any, step_rows: Sequence[Any], shown: Sequence[Any]) -> InstanceInfo:
    """The instance and its steps, with ``payload_values`` as a person reads them (``show_payloads``)."""
    params, output, *values = shown
    steps = [step_info(step, *values[2 * at : 2 * at + 2]) for at, step in enumerate(step_rows)]
    return instance_info(row, steps, params, output)


def instance_info(row: Any, steps: list[StepInfo], params: Any, output: Any) -> InstanceInfo:
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


def step_info(row: Any, result: Any, heartbeat: Any) -> StepInfo:
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
        waiting_for=waiting_for(row.detail),
        heartbeat=heartbeat,
        heartbeat_at=row.heartbeat_at,
    )


def waiting_for(detail: Any) -> str | None:
    """The reason a step waits for a limit, as the limit statements store it in its detail."""
    waiting = detail.get(WAITING_FOR) if isinstance(detail, dict) else None
    return str(waiting.get("reason")) if isinstance(waiting, dict) else None


__all__ = ["instance_info", "payload_values", "step_info", "waiting_for", "with_shown"]
