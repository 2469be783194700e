"""Many steps' commits in one statement (PostgreSQL): the group commit's batch.

A worker commits each step with one statement (``settled_step_call``), built
for the shape of what it writes. Concurrent commits wait for each other and go
together (``stepline.shared.db.group_commit``); sent as one statement each,
psycopg converted, dumped and sent every one of them, about a quarter of a
worker's time. Here a whole batch is one statement with a fixed text: the
commits and their new entries travel as JSON arrays (``jsonb_to_recordset``),
the messages as arrays (``unnest``), so a batch costs one parse, one send and
one plan, and psycopg prepares the text once per connection.

Each commit keeps its own fence, as alone: its instance row is updated only at
the version it was planned at, and only while the instance is not finished;
every other part writes only for the instances that were (joined on
``changed_instance``). A commit whose fence refused it gets no row back. The
instances are locked first, in id order (``locked``, consumed whole before the
update starts), so two batches never wait for each other in a cycle. The
caller puts each instance in a batch at most once (``GroupCommit``).

The rows: one per message of each commit that went through (its number in the
batch, then the outbox row's columns), or one row of its number and NULLs if it
queued none.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from stepline.shared.db.batch_starts import MessageColumns, entry_row
from stepline.shared.db.postgres_writes import settled_step_call
from stepline.shared.db.records import Message, NewStep, SucceededAttempt
from stepline.shared.history import StepKey
from stepline.shared.states import FINISHED_STATUSES, InstanceStatus

_FINISHED = ", ".join(f"'{status.value}'" for status in sorted(FINISHED_STATUSES))


@dataclass(frozen=True, slots=True)
class SettledStep:
    """One step's commit (``Transaction.commit_settled_step``'s arguments)."""

    instance_id: str
    key: StepKey
    fields: dict[str, Any]

    def alone(self) -> tuple[sa.Select[Any], dict[str, Any]]:
        """Its own statement and parameters (``settled_step_call``)."""
        return settled_step_call(self.instance_id, self.key, **self.fields)


SETTLE_MANY = sa.text(f"""
WITH c AS (
    SELECT * FROM jsonb_to_recordset(CAST(:commits AS jsonb)) AS c(n integer, id text, version bigint,
        status text, finishing boolean, output jsonb, error jsonb, step text, occurrence integer,
        result jsonb, started_at timestamptz, attempt integer, worker text, finished_at timestamptz,
        build_id text)
),
locked AS (
    SELECT id FROM instances WHERE id IN (SELECT id FROM c) ORDER BY id FOR UPDATE
),
changed_instance AS (
    UPDATE instances SET status = c.status, version = instances.version + 1, updated_at = now(),
        output = CASE WHEN c.finishing THEN c.output ELSE instances.output END,
        error = CASE WHEN c.finishing THEN c.error ELSE instances.error END,
        finished_at = CASE WHEN c.finishing THEN now() ELSE instances.finished_at END
    FROM c
    WHERE instances.id = c.id AND instances.version = c.version
        AND instances.status NOT IN ({_FINISHED})
        AND (SELECT count(*) FROM locked) >= 0
    RETURNING c.n, instances.id, instances.version, c.finishing, c.step, c.occurrence, c.result,
        c.started_at, c.attempt, c.worker, c.finished_at, c.build_id
),
recorded_attempt AS (
    INSERT INTO step_attempts (instance_id, name, occurrence, attempt, worker, outcome, error, started_at,
        finished_at, build_id)
    SELECT id, step, occurrence, attempt, worker, 'succeeded', NULL, started_at, finished_at, build_id
    FROM changed_instance
    WHERE attempt IS NOT NULL
    ON CONFLICT DO NOTHING
),
settled_step AS (
    UPDATE steps SET status = 'succeeded', result = changed_instance.result, error = NULL,
        started_at = coalesce(steps.started_at, changed_instance.started_at), finished_at = now(),
        updated_at = now(), version = changed_instance.version
    FROM changed_instance
    WHERE steps.instance_id = changed_instance.id AND steps.name = changed_instance.step
        AND steps.occurrence = changed_instance.occurrence
),
cancelled_timers AS (
    DELETE FROM timers USING changed_instance
    WHERE timers.instance_id = changed_instance.id AND changed_instance.finishing
),
new_steps AS (
    INSERT INTO steps (instance_id, name, occurrence, position, kind, status, result, fire_at, detail,
        attempt, started_at, finished_at, version)
    SELECT changed_instance.id, s.name, s.occurrence, s.position, s.kind, s.status, s.result,
        COALESCE(s.fire_at, now() + make_interval(secs => s.delay)), s.detail, 1,
        CASE WHEN s.kind <> 'step' THEN now() END, CASE WHEN s.settled THEN now() END,
        changed_instance.version
    FROM jsonb_to_recordset(CAST(:steps AS jsonb)) AS s(n integer, name text, occurrence integer,
        position integer, kind text, status text, result jsonb, fire_at timestamptz,
        delay double precision, detail jsonb, settled boolean)
    JOIN changed_instance ON changed_instance.n = s.n
),
message AS (
    SELECT nextval((SELECT pg_get_serial_sequence('outbox', 'id'))) AS id, m.n, m.routing_key, m.body,
        CAST(m.headers AS jsonb) AS headers
    FROM unnest(CAST(:m_n AS integer[]), CAST(:m_routing_key AS text[]), CAST(:m_body AS bytea[]),
        CAST(:m_headers AS text[])) WITH ORDINALITY AS m(n, routing_key, body, headers, position)
    JOIN changed_instance ON changed_instance.n = m.n
    ORDER BY m.position
),
queued AS (
    INSERT INTO outbox (id, routing_key, body, headers)
    SELECT id, routing_key, body, headers FROM message
)
SELECT changed_instance.n, message.id, message.routing_key, message.body, message.headers
FROM changed_instance
LEFT JOIN message ON message.n = changed_instance.n
ORDER BY changed_instance.n, message.id
""")
"""The one statement of a batch of ``commit_settled_step``. Its text is fixed: psycopg prepares it once."""


def settle_many_params(batch: Sequence[SettledStep]) -> dict[str, Any]:
    """The statement's parameters for ``batch`` (each instance at most once); commit ``n`` is ``batch[n]``."""
    commits: list[dict[str, Any]] = []
    entries: list[dict[str, Any]] = []
    messages = MessageColumns()
    for n, commit in enumerate(batch):
        fields = commit.fields
        commits.append(_commit_row(n, commit))
        new_steps: Sequence[NewStep] = fields["new_steps"]
        entries.extend({"n": n, **entry_row(entry)} for entry in new_steps)
        found: Sequence[Message] = fields.get("messages", ())
        messages.add(n, found)
    return {
        "commits": json.dumps(commits, separators=(",", ":")),
        "steps": json.dumps(entries, separators=(",", ":")),
        **messages.params("m_n"),
    }


def _commit_row(n: int, commit: SettledStep) -> dict[str, Any]:
    fields = commit.fields
    attempt: SucceededAttempt | None = fields["attempt"]
    status: InstanceStatus = fields["status"]
    return {
        "n": n,
        "id": commit.instance_id,
        "version": fields["version"],
        "status": status.value,
        "finishing": status.is_finished,
        "output": fields.get("output"),
        "error": fields.get("error"),
        "step": commit.key[0],
        "occurrence": commit.key[1],
        "result": fields["result"],
        "started_at": None if attempt is None else attempt.started_at.isoformat(),
        "attempt": None if attempt is None else attempt.number,
        "worker": None if attempt is None else attempt.worker,
        "finished_at": None if attempt is None else attempt.finished_at.isoformat(),
        "build_id": None if attempt is None else attempt.build_id,
    }


__all__ = ["SETTLE_MANY", "SettledStep", "settle_many_params"]
