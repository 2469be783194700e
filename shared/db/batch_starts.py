"""Many new instances in one statement: their rows, first entries, timers and messages (PostgreSQL).

A worker with a backlog of starts takes many start deliveries at once
(``stepline.worker.start_batches``). One start on its own costs a statement
(``Transaction.start_instance``), or a transaction of four or five when its
first entry is a sleep; most of a start's CPU was building and running them.
Here a whole batch is one statement with a fixed text: each table's rows
travel as one JSON array (``jsonb_to_recordset``) or as arrays (``unnest``),
so nothing is compiled per start and the text is prepared once per connection.

Only the instances that did not exist get their entries, timers and messages
(``ON CONFLICT DO NOTHING`` on the id; the rest join ``new_instances``): the
statement returns the ids it created, and the caller treats the others as
duplicate starts. A sleep's timer takes the fire time its entry row got from
the database's clock, as in ``Planner._record_blocked``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa

from stepline.shared.codec import JSON
from stepline.shared.db.records import Message, NewStep, NewTimer, OutboxRow
from stepline.shared.history import ParentLink
from stepline.shared.states import InstanceStatus, StepKind


@dataclass(frozen=True, slots=True)
class NewInstance:
    """One start of a batch: the instance row and everything its first replay wrote."""

    instance_id: str
    workflow: str
    params: JSON
    trace_context: dict[str, str] | None
    parent: ParentLink | None
    build_id: str | None
    priority: int
    status: InstanceStatus
    new_steps: Sequence[NewStep]
    messages: Sequence[Message] = ()
    sleeps: Sequence[NewTimer] = ()
    """The timers of its sleep entries: each fires at the time its entry row gets."""
    output: JSON = None
    error: JSON = None


@dataclass(slots=True)
class StartedBatch:
    """What the statement wrote: the ids it created (the others existed) and the outbox rows."""

    created: set[str] = field(default_factory=set)
    rows: list[OutboxRow] = field(default_factory=list)


START_MANY = sa.text("""
WITH new_instances AS (
    INSERT INTO instances (id, workflow, status, params, trace_context, parent_id, parent_workflow,
        parent_step, parent_occurrence, build_id, priority, output, error, finished_at, version)
    SELECT r.id, r.workflow, r.status, r.params, r.trace_context, r.parent_id, r.parent_workflow,
        r.parent_step, r.parent_occurrence, r.build_id, r.priority, r.output, r.error,
        CASE WHEN r.finished THEN now() END, 1
    FROM jsonb_to_recordset(CAST(:instances AS jsonb)) AS r(id text, workflow text, status text,
        params jsonb, trace_context jsonb, parent_id text, parent_workflow text, parent_step text,
        parent_occurrence integer, build_id text, priority smallint, output jsonb, error jsonb,
        finished boolean)
    ORDER BY r.id
    ON CONFLICT (id) DO NOTHING
    RETURNING id
),
new_steps AS (
    INSERT INTO steps (instance_id, name, occurrence, position, kind, status, result, fire_at, detail,
        attempt, started_at, finished_at, version)
    SELECT s.instance_id, s.name, s.occurrence, s.position, s.kind, s.status, s.result,
        COALESCE(s.fire_at, now() + make_interval(secs => s.delay)), s.detail, 1,
        CASE WHEN s.kind <> 'step' THEN now() END, CASE WHEN s.settled THEN now() END, 1
    FROM jsonb_to_recordset(CAST(:steps AS jsonb)) AS s(instance_id text, name text, occurrence integer,
        position integer, kind text, status text, result jsonb, fire_at timestamptz,
        delay double precision, detail jsonb, settled boolean)
    JOIN new_instances ON new_instances.id = s.instance_id
    RETURNING instance_id, name, occurrence, fire_at
),
new_timers AS (
    INSERT INTO timers (instance_id, step, occurrence, attempt, kind, fire_at, routing_key, body, headers)
    SELECT t.instance_id, t.step, t.occurrence, t.attempt, t.kind, new_steps.fire_at, t.routing_key,
        t.body, CAST(t.headers AS jsonb)
    FROM unnest(CAST(:t_instance AS text[]), CAST(:t_step AS text[]), CAST(:t_occurrence AS integer[]),
        CAST(:t_attempt AS integer[]), CAST(:t_kind AS text[]), CAST(:t_routing_key AS text[]),
        CAST(:t_body AS bytea[]), CAST(:t_headers AS text[]))
        AS t(instance_id, step, occurrence, attempt, kind, routing_key, body, headers)
    JOIN new_steps ON new_steps.instance_id = t.instance_id AND new_steps.name = t.step
        AND new_steps.occurrence = t.occurrence
    ON CONFLICT DO NOTHING
),
queued AS (
    INSERT INTO outbox (routing_key, body, headers)
    SELECT m.routing_key, m.body, CAST(m.headers AS jsonb)
    FROM unnest(CAST(:m_instance AS text[]), CAST(:m_routing_key AS text[]), CAST(:m_body AS bytea[]),
        CAST(:m_headers AS text[])) AS m(instance_id, routing_key, body, headers)
    JOIN new_instances ON new_instances.id = m.instance_id
    RETURNING id, routing_key, body, headers
)
SELECT id, NULL::bigint, NULL::text, NULL::bytea, NULL::jsonb FROM new_instances
UNION ALL
SELECT NULL, id, routing_key, body, headers FROM queued
""")
"""The one statement of ``start_instances``. Its text is fixed: psycopg prepares it once per connection."""


_TIMER_COLUMNS = (
    "t_instance", "t_step", "t_occurrence", "t_attempt", "t_kind", "t_routing_key", "t_body", "t_headers",
)  # fmt: skip


def start_many_params(batch: Sequence[NewInstance]) -> dict[str, Any]:
    """The statement's parameters for ``batch`` (ids unique within it)."""
    instances: list[dict[str, Any]] = []
    entries: list[dict[str, Any]] = []
    sleeps: tuple[list[Any], ...] = ([], [], [], [], [], [], [], [])
    messages = MessageColumns()
    for new in batch:
        parent = new.parent
        instances.append(
            {
                "id": new.instance_id,
                "workflow": new.workflow,
                "status": new.status.value,
                "params": new.params,
                "trace_context": new.trace_context,
                "parent_id": parent and parent.instance_id,
                "parent_workflow": parent and parent.workflow,
                "parent_step": parent and parent.step,
                "parent_occurrence": parent and parent.occurrence,
                "build_id": new.build_id,
                "priority": new.priority,
                "output": new.output,
                "error": new.error,
                "finished": new.status.is_finished,
            }
        )
        entries.extend({"instance_id": new.instance_id, **entry_row(entry)} for entry in new.new_steps)
        for timer in new.sleeps:
            row = (new.instance_id, *timer.key, timer.attempt, timer.kind, timer.routing_key, timer.body)
            for column, value in zip(sleeps, (*row, _headers(timer.headers)), strict=True):
                column.append(value)
        messages.add(new.instance_id, new.messages)
    return {
        "instances": json.dumps(instances, separators=(",", ":")),
        "steps": json.dumps(entries, separators=(",", ":")),
        **dict(zip(_TIMER_COLUMNS, sleeps, strict=True)),
        **messages.params("m_instance"),
    }


@dataclass(slots=True)
class MessageColumns:
    """Messages as a statement's arrays (``unnest``): whose, routing key, body, headers (JSON text)."""

    owners: list[Any] = field(default_factory=list)
    routing_keys: list[str] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)
    headers: list[str | None] = field(default_factory=list)

    def add(self, owner: Any, messages: Sequence[Message]) -> None:
        for routing_key, body, headers in messages:
            self.owners.append(owner)
            self.routing_keys.append(routing_key)
            self.bodies.append(body)
            self.headers.append(_headers(headers))

    def params(self, owner_name: str) -> dict[str, list[Any]]:
        """The arrays by parameter name: ``owner_name``, ``m_routing_key``, ``m_body``, ``m_headers``."""
        return {
            owner_name: self.owners,
            "m_routing_key": self.routing_keys,
            "m_body": self.bodies,
            "m_headers": self.headers,
        }


def entry_row(entry: NewStep) -> dict[str, Any]:
    """A new entry as a row of a statement's ``steps`` recordset (its instance's column apart).

    Its fire time is ``fire_at``, else the database's clock plus ``delay`` seconds.
    """
    return {
        "name": entry.key[0],
        "occurrence": entry.key[1],
        "position": entry.position,
        "kind": StepKind(entry.kind).value,
        "status": entry.status.value,
        "result": entry.result,
        "fire_at": None if entry.delay is not None else _time(entry.fire_at),
        "delay": None if entry.delay is None else _seconds(entry.delay),
        "detail": entry.detail,
        "settled": entry.status.is_settled,
    }


def started_batch(rows: Sequence[tuple[Any, ...]]) -> StartedBatch:
    """The statement's rows as the ids created and the outbox rows to publish."""
    started = StartedBatch()
    for instance_id, row_id, routing_key, body, headers in rows:
        if instance_id is not None:
            started.created.add(instance_id)
        else:
            started.rows.append(OutboxRow(row_id, routing_key, body, headers))
    return started


def _time(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def _seconds(value: timedelta) -> float:
    return value.total_seconds()


def _headers(value: dict[str, str] | None) -> str | None:
    return None if value is None else json.dumps(value)
