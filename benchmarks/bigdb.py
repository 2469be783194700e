"""Fill a fresh database with a big, realistic history, inserted directly by PostgreSQL itself.

``populate(database_url, instances=1_000_000, steps_per_instance=10)`` writes, into a
database already migrated with the project's migrations:

- ``instances`` finished instances (90% complete, 7% errored, 3% terminated) of
  eight workflows of uneven popularity, created over the last six weeks (oldest
  first in the heap, as a live table grows), a new build id every 3.5 days;
- ``steps_per_instance`` steps each (one of them a sleep; the first workflow also waits
  for an event, with its ``events`` row), and the ``step_attempts`` a worker would have
  recorded (an errored instance's last step failed three attempts);
- a tail of ``unfinished`` instances created over the last two days: running, sleeping
  (with their armed ``sleep`` timer, due in days), waiting for an event (with its
  ``event-timeout`` timer), queued, and paused, each with its steps so far.

Every row is made by ``INSERT ... SELECT`` over ``generate_series`` inside the server
(no rows cross the wire). The secondary indexes, keys and foreign keys of the tables
written are dropped first and built again after the load (a bulk build is many times
cheaper than a million index insertions), exactly as the migrations declared them:
their definitions are read from the catalogue. Two connections share the work.
Finally ``VACUUM ANALYZE`` sets the visibility map and statistics, as autovacuum
would have on a database that grew over weeks.

``python -m benchmarks.bigdb [--instances N] [--keep-bigdb]`` creates its own database,
fills it, prints what it took, and drops it unless told to keep it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg
from sqlalchemy.engine import make_url

from stepline.shared.db import stores
from stepline.shared.db.migrate import upgrade_postgres

WORKFLOWS = (
    "order-fulfilment",
    "invoice-run",
    "email-digest",
    "user-onboarding",
    "report-export",
    "data-sync",
    "refund",
    "nightly-cleanup",
)
"""Popularity falls with the position: the first is about a third of all instances."""
RARE_WORKFLOW = "monthly-report"
"""One instance in a thousand: the list of a rare workflow, newest first, must not walk the others."""
EVENT_WORKFLOW = WORKFLOWS[0]
"""The workflow whose instances wait for ``payment.settled`` (step position 6)."""
STEP_NAMES = (
    "validate",
    "reserve-stock",
    "charge",
    "notify",
    "cool-off",
    "ship",
    "payment",
    "invoice",
    "email",
    "archive",
)
SLEEP_POSITION = 4
EVENT_POSITION = 6
WEEKS = 6
BUILD_EVERY_DAYS = 3.5
TABLES = ("instances", "steps", "step_attempts", "events", "timers")
BYTES_PER_INSTANCE = 6_000
"""Disk a finished instance with 10 steps takes, tables, indexes and WAL at peak (measured, rounded up)."""
CONNECTIONS = 2
CHUNKS = 16
"""The instance ids' first hex digit: how the steps and attempts loads are cut for progress."""

Progress = Callable[[str], None]


@dataclass(frozen=True)
class Shape:
    """What ``populate`` writes."""

    instances: int = 1_000_000
    steps_per_instance: int = 10
    unfinished: int | None = None
    """Unfinished instances; default 5% of ``instances`` (50,000 for a million)."""

    @property
    def tail(self) -> int:
        return self.unfinished if self.unfinished is not None else max(1_000, self.instances // 20)


@dataclass
class Populated:
    """What ``populate`` wrote and how long each phase took."""

    shape: Shape
    rows: dict[str, int] = field(default_factory=dict)
    """Rows each phase wrote."""
    tables: dict[str, int] = field(default_factory=dict)
    """Rows each table holds at the end."""
    phases_s: dict[str, float] = field(default_factory=dict)
    database_bytes: int = 0
    total_s: float = 0.0

    def as_json(self) -> dict[str, Any]:
        return {
            "instances": self.shape.instances,
            "steps_per_instance": self.shape.steps_per_instance,
            "unfinished": self.shape.tail,
            "rows": self.rows,
            "tables": self.tables,
            "phases_s": {name: round(value, 1) for name, value in self.phases_s.items()},
            "database_mib": round(self.database_bytes / 2**20),
            "total_s": round(self.total_s, 1),
        }


# ---------------------------------------------------------------- the statements

_START = f"(now() - interval '{WEEKS} weeks 1 hour')"
"""When the oldest finished instance was created (the newest, an hour ago)."""

_WORKFLOW_PICK = (
    # A skewed pick: floor(8 * r^2) puts about a third of the rows on the first workflow.
    "(ARRAY[{names}])[1 + floor(8 * power(random(), 2))::int]"
).format(names=", ".join(f"'{name}'" for name in WORKFLOWS))

INSERT_FINISHED = f"""
INSERT INTO instances (id, workflow, status, params, output, error, trace_context, version,
                       created_at, updated_at, finished_at, build_id, priority)
SELECT md5('finished-' || g.i)::uuid::text,
       w.workflow,
       s.status,
       jsonb_build_object('order', g.i, 'sku', 'sku-' || mod(g.i, 997), 'amount', mod(g.i, 100000) / 100.0),
       CASE WHEN s.status = 'complete'
            THEN jsonb_build_object('receipt', 'r-' || g.i, 'shipped', true) END,
       CASE WHEN s.status = 'errored'
            THEN jsonb_build_object('type', 'StepFailedError',
                                    'message', 'step `charge` failed after 3 attempts: card declined')
            WHEN s.status = 'terminated'
            THEN jsonb_build_object('type', 'Terminated', 'message', 'terminated by an operator') END,
       jsonb_build_object('traceparent',
                          '00-' || md5('trace-' || g.i) || '-' || left(md5('span-' || g.i), 16) || '-01'),
       %(steps)s + 1,
       t.created_at, t.created_at + t.took, t.created_at + t.took,
       'build-' || lpad(floor(extract(epoch FROM t.created_at - {_START})
                              / ({BUILD_EVERY_DAYS} * 86400))::text, 2, '0'),
       0
FROM generate_series(%(first)s::bigint, %(last)s::bigint) AS g(i)
CROSS JOIN LATERAL (
    SELECT CASE WHEN mod(g.i, 1000) = 0 THEN '{RARE_WORKFLOW}' ELSE {_WORKFLOW_PICK} END AS workflow,
           random() AS r, g.i AS i
) AS w
CROSS JOIN LATERAL (
    SELECT CASE WHEN w.r < 0.90 THEN 'complete' WHEN w.r < 0.97 THEN 'errored' ELSE 'terminated' END AS status
) AS s
CROSS JOIN LATERAL (
    SELECT {_START} + ((g.i - 1 + random()) * %(spacing_s)s) * interval '1 second'
               AS created_at,
           (1 + random() * 300) * interval '1 second' AS took
) AS t
"""
"""Finished instances ``first``..``last``, oldest first, ``spacing_s`` apart from ``start`` on."""

_NAMES = "ARRAY[{}]".format(", ".join(f"'{name}'" for name in STEP_NAMES))

FINISHED_STEPS = f"""
SELECT i.id AS instance_id,
       ({_NAMES})[mod(p, {len(STEP_NAMES)}) + 1] AS name,
       p / {len(STEP_NAMES)} AS occurrence,
       p AS position,
       CASE WHEN mod(p, {len(STEP_NAMES)}) = {SLEEP_POSITION} THEN 'sleep'
            WHEN mod(p, {len(STEP_NAMES)}) = {EVENT_POSITION} AND i.workflow = '{EVENT_WORKFLOW}' THEN 'event'
            ELSE 'step' END AS kind,
       CASE WHEN p < last.final THEN 'succeeded'
            WHEN i.status = 'errored' THEN 'failed'
            WHEN i.status = 'terminated' THEN 'running'
            ELSE 'succeeded' END AS status,
       CASE WHEN p = last.final AND i.status = 'errored' THEN 3 ELSE 1 END AS attempt,
       i.created_at + (i.finished_at - i.created_at) * p / last.total AS started_at,
       CASE WHEN p = last.final AND i.status = 'terminated' THEN NULL
            ELSE i.created_at + (i.finished_at - i.created_at) * (p + 1) / last.total END AS finished_at,
       i.build_id
FROM instances AS i
CROSS JOIN LATERAL (SELECT %(steps)s AS total, %(steps)s - 1 AS final) AS last
CROSS JOIN generate_series(0, %(steps)s - 1) AS p
WHERE left(i.id, 1) = %(chunk)s AND i.finished_at IS NOT NULL
"""
"""Every step of the finished instances whose id starts with ``chunk``, with its instance's build."""

INSERT_FINISHED_STEPS = f"""
INSERT INTO steps (instance_id, name, occurrence, position, kind, status, attempt, result, error,
                   fire_at, detail, started_at, finished_at, updated_at)
SELECT s.instance_id, s.name, s.occurrence, s.position, s.kind, s.status, s.attempt,
       CASE WHEN s.kind = 'step' AND s.status = 'succeeded'
            THEN jsonb_build_object('ok', true, 'position', s.position)
            WHEN s.kind = 'event' THEN jsonb_build_object('amount', 12.5, 'currency', 'EUR') END,
       CASE WHEN s.status = 'failed'
            THEN jsonb_build_object('type', 'CardDeclined', 'message', 'card declined') END,
       CASE WHEN s.kind = 'sleep' THEN s.finished_at END,
       CASE WHEN s.kind = 'event' THEN jsonb_build_object('event_type', 'payment.settled') END,
       s.started_at, s.finished_at, coalesce(s.finished_at, s.started_at)
FROM ({FINISHED_STEPS}) AS s
"""

INSERT_FINISHED_ATTEMPTS = f"""
INSERT INTO step_attempts (instance_id, name, occurrence, attempt, worker, outcome, error,
                           started_at, finished_at, build_id)
SELECT s.instance_id, s.name, s.occurrence, a,
       'worker-' || (hashtext(s.instance_id) & 7) || '-' || a,
       CASE WHEN s.status = 'failed' OR a < s.attempt THEN 'failed' ELSE 'succeeded' END,
       CASE WHEN s.status = 'failed' OR a < s.attempt
            THEN jsonb_build_object('type', 'CardDeclined', 'message', 'card declined') END,
       s.started_at + (s.finished_at - s.started_at) * (a - 1) / s.attempt,
       s.started_at + (s.finished_at - s.started_at) * a / s.attempt,
       s.build_id
FROM ({FINISHED_STEPS}) AS s
CROSS JOIN generate_series(1, s.attempt) AS a
WHERE s.kind = 'step' AND s.finished_at IS NOT NULL
"""

INSERT_FINISHED_EVENTS = f"""
INSERT INTO events (instance_id, event_id, event_type, payload, created_at,
                    consumed_step, consumed_occurrence, consumed_at)
SELECT i.id, md5('event-' || i.id), 'payment.settled', jsonb_build_object('amount', 12.5, 'currency', 'EUR'),
       i.created_at + (i.finished_at - i.created_at) * {EVENT_POSITION} / %(steps)s,
       'payment', 0, i.created_at + (i.finished_at - i.created_at) * {EVENT_POSITION + 1} / %(steps)s
FROM instances AS i
WHERE i.workflow = '{EVENT_WORKFLOW}' AND i.finished_at IS NOT NULL AND %(steps)s > {EVENT_POSITION}
"""

INSERT_UNFINISHED = f"""
INSERT INTO instances (id, workflow, status, params, trace_context, version, created_at, updated_at,
                       build_id, priority)
SELECT md5('unfinished-' || g.i)::uuid::text,
       w.workflow,
       CASE WHEN w.r < 0.30 THEN 'running' WHEN w.r < 0.80 THEN 'waiting'
            WHEN w.r < 0.90 THEN 'queued' ELSE 'paused' END,
       jsonb_build_object('order', g.i, 'sku', 'sku-' || mod(g.i, 997), 'amount', mod(g.i, 100000) / 100.0),
       jsonb_build_object('traceparent',
                          '00-' || md5('utrace-' || g.i) || '-' || left(md5('uspan-' || g.i), 16) || '-01'),
       1, t.created_at, t.created_at, 'build-current', mod(g.i, 3)::smallint
FROM generate_series(1, %(count)s::bigint) AS g(i)
CROSS JOIN LATERAL (SELECT {_WORKFLOW_PICK} AS workflow, random() AS r, g.i AS i) AS w
CROSS JOIN LATERAL (
    SELECT now() - interval '2 days' + (g.i * %(spacing_s)s) * interval '1 second' AS created_at
) AS t
"""
"""Unfinished instances over the last two days: 30% running, 50% waiting, 10% queued, 10% paused."""

UNFINISHED_STEPS = f"""
SELECT i.id AS instance_id, i.workflow, i.status, i.created_at,
       ({_NAMES})[mod(p, {len(STEP_NAMES)}) + 1] AS name,
       p / {len(STEP_NAMES)} AS occurrence,
       p AS position,
       p = d.done AS is_current,
       i.created_at + interval '3 days' AS fire_at,
       i.trace_context,
       CASE WHEN p < d.done THEN 'step'
            WHEN i.status = 'waiting' AND hashtext(i.id) & 1 = 0 THEN 'sleep'
            WHEN i.status = 'waiting' THEN 'event'
            ELSE 'step' END AS kind
FROM instances AS i
CROSS JOIN LATERAL (SELECT mod(abs(hashtext(i.id)), %(steps)s) AS done) AS d
CROSS JOIN generate_series(0, %(steps)s - 1) AS p
WHERE i.finished_at IS NULL AND i.status <> 'queued'
  AND (p < d.done OR (p = d.done AND i.status IN ('running', 'waiting')))
"""
"""The steps so far of each unfinished instance: ``done`` succeeded, then the current one if any."""

INSERT_UNFINISHED_STEPS = f"""
INSERT INTO steps (instance_id, name, occurrence, position, kind, status, attempt, result,
                   fire_at, detail, started_at, finished_at, updated_at)
SELECT s.instance_id, s.name, s.occurrence, s.position, s.kind,
       CASE WHEN NOT s.is_current THEN 'succeeded' WHEN s.kind = 'step' THEN 'running' ELSE 'waiting' END,
       1,
       CASE WHEN NOT s.is_current THEN jsonb_build_object('ok', true, 'position', s.position) END,
       CASE WHEN s.is_current AND s.kind <> 'step' THEN s.fire_at END,
       CASE WHEN s.is_current AND s.kind = 'event'
            THEN jsonb_build_object('event_type', 'payment.settled') END,
       s.created_at + s.position * interval '2 seconds',
       CASE WHEN NOT s.is_current THEN s.created_at + (s.position + 1) * interval '2 seconds' END,
       s.created_at + (s.position + 1) * interval '2 seconds'
FROM ({UNFINISHED_STEPS}) AS s
"""

INSERT_UNFINISHED_ATTEMPTS = f"""
INSERT INTO step_attempts (instance_id, name, occurrence, attempt, worker, outcome, started_at, finished_at,
                           build_id)
SELECT s.instance_id, s.name, s.occurrence, 1, 'worker-' || (hashtext(s.instance_id) & 7) || '-1',
       'succeeded', s.created_at + s.position * interval '2 seconds',
       s.created_at + (s.position + 1) * interval '2 seconds', 'build-current'
FROM ({UNFINISHED_STEPS}) AS s
WHERE NOT s.is_current
"""

INSERT_TIMERS = f"""
INSERT INTO timers (instance_id, step, occurrence, attempt, kind, fire_at, routing_key, body, headers,
                    created_at)
SELECT s.instance_id, s.name, s.occurrence, 1,
       CASE WHEN s.kind = 'sleep' THEN 'sleep' ELSE 'event-timeout' END,
       s.fire_at, 'step.' || s.workflow,
       convert_to(json_build_object('version', 1, 'instance_id', s.instance_id, 'workflow', s.workflow,
                                    'step', s.name, 'occurrence', s.occurrence, 'attempt', 1)::text, 'UTF8'),
       jsonb_build_object('traceparent', s.trace_context ->> 'traceparent'),
       s.created_at + (s.position + 1) * interval '2 seconds'
FROM ({UNFINISHED_STEPS}) AS s
WHERE s.is_current AND s.kind <> 'step'
"""
"""The armed timer of every waiting sleep and event wait (due in days: nothing fires during a bench)."""

CATALOGUE = """
SELECT c.conrelid::regclass::text AS tbl, c.conname AS name, c.contype::text AS kind,
       pg_get_constraintdef(c.oid) AS definition
FROM pg_constraint AS c
WHERE (c.conrelid = ANY(%(tables)s::regclass[]) AND c.contype IN ('p', 'u', 'f'))
   OR (c.confrelid = ANY(%(tables)s::regclass[]) AND c.contype = 'f')
UNION ALL
SELECT x.indrelid::regclass::text, i.relname, 'i', pg_get_indexdef(x.indexrelid)
FROM pg_index AS x JOIN pg_class AS i ON i.oid = x.indexrelid
WHERE x.indrelid = ANY(%(tables)s::regclass[])
  AND NOT EXISTS (SELECT 1 FROM pg_constraint AS c
                  WHERE c.conindid = x.indexrelid AND c.contype IN ('p', 'u'))
"""


@dataclass(frozen=True)
class Definition:
    """One key, foreign key or index of a table the load writes, as the catalogue gives it."""

    table: str
    name: str
    kind: str
    """``p`` primary key, ``u`` unique, ``f`` foreign key, ``i`` plain index."""
    definition: str

    def drop(self) -> str:
        if self.kind == "i":
            return f'DROP INDEX "{self.name}"'
        return f'ALTER TABLE {self.table} DROP CONSTRAINT "{self.name}"'

    def create(self) -> str:
        if self.kind == "i":
            return self.definition
        # A foreign key is added NOT VALID: the loaded rows are consistent by construction, and
        # checking 10,000,000 of them would double the load. New rows are checked, and ON DELETE
        # CASCADE works, exactly as for a validated key.
        valid = " NOT VALID" if self.kind == "f" else ""
        return f'ALTER TABLE {self.table} ADD CONSTRAINT "{self.name}" {self.definition}{valid}'


# ---------------------------------------------------------------- running them


class _Loader:
    """Two connections working through lists of statements, with progress lines."""

    def __init__(self, database_url: str, progress: Progress) -> None:
        self.database_url = database_url
        self.progress = progress
        self.began = time.monotonic()
        self.conns: list[psycopg.AsyncConnection[Any]] = []

    async def __aenter__(self) -> _Loader:
        for _ in range(CONNECTIONS):
            conn = await psycopg.AsyncConnection.connect(self.database_url, autocommit=True)
            # Bulk work: room to sort and hash in memory; no waiting for the WAL flush on each commit.
            await conn.execute("SET maintenance_work_mem = '256MB'")
            await conn.execute("SET work_mem = '64MB'")
            await conn.execute("SET synchronous_commit = off")
            await conn.execute(
                "SET jit = off"
            )  # compiling each big INSERT ... SELECT costs more than it saves
            self.conns.append(conn)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        for conn in self.conns:
            await conn.close()

    def say(self, text: str) -> None:
        self.progress(f"[{time.monotonic() - self.began:6.1f}s] {text}")

    async def run(
        self, label: str, statements: Sequence[tuple[str, dict[str, Any]]], *, every: int = 1
    ) -> tuple[int, float]:
        """Run ``statements`` on both connections, each taking the next; returns (rows, seconds)."""
        started = time.monotonic()
        queue = list(enumerate(statements))
        queue.reverse()
        done = 0
        rows = 0

        async def drain(conn: psycopg.AsyncConnection[Any]) -> None:
            nonlocal done, rows
            while queue:
                _, (sql, params) = queue.pop()
                cursor = await conn.execute(sql.encode(), params or None)
                rows += max(cursor.rowcount, 0)
                done += 1
                if done % every == 0 or done == len(statements):
                    self.say(f"{label}: {done}/{len(statements)}, {rows:,} rows")

        await asyncio.gather(*(drain(conn) for conn in self.conns))
        return rows, time.monotonic() - started


async def populate(
    database_url: str,
    instances: int = 1_000_000,
    steps_per_instance: int = 10,
    *,
    unfinished: int | None = None,
    progress: Progress = print,
) -> Populated:
    """Fill the migrated, empty database at ``database_url``; returns the row counts and timings.

    Raises:
        RuntimeError: the database already holds instances, or the disk is too small.
    """
    shape = Shape(instances, steps_per_instance, unfinished)
    result = Populated(shape)
    async with _Loader(database_url, progress) as load:
        first = load.conns[0]
        found = await (
            await first.execute("SELECT count(*) FROM (SELECT 1 FROM instances LIMIT 1) AS x")
        ).fetchone()
        if found and found[0]:
            raise RuntimeError("populate: the database already holds instances; give it a fresh one")
        await _check_disk(first, shape)
        definitions = await _definitions(first)
        for definition in sorted(definitions, key=lambda d: "fpui".index(d.kind)):
            await first.execute(definition.drop().encode())
        load.say(f"dropped {len(definitions)} keys and indexes of {', '.join(TABLES)} for the load")
        for phase, statements, every in _phases(shape):
            rows, seconds = await load.run(phase, statements, every=every)
            result.rows[phase] = rows
            result.phases_s[phase] = seconds
        await _rebuild(load, definitions, result)
        started = time.monotonic()
        await load.run("vacuum analyze", [(f"VACUUM (ANALYZE) {table}", {}) for table in TABLES])
        result.phases_s["vacuum analyze"] = time.monotonic() - started
        size = await (await first.execute("SELECT pg_database_size(current_database())")).fetchone()
        result.database_bytes = int(size[0]) if size else 0
        # Exact after VACUUM: what each table holds, whatever the phases wrote it in.
        cursor = await first.execute(
            b"SELECT relname, reltuples::bigint FROM pg_class WHERE relname = ANY(%(tables)s)",
            {"tables": list(TABLES)},
        )
        result.tables = {str(name): int(count) for name, count in await cursor.fetchall()}
    result.total_s = time.monotonic() - load.began
    progress(
        f"populated {shape.instances:,} finished + {shape.tail:,} unfinished instances, "
        f"{result.tables.get('steps', 0):,} steps, {result.tables.get('step_attempts', 0):,} attempts "
        f"in {result.total_s:.0f}s "
        f"({result.database_bytes / 2**30:.1f} GiB)"
    )
    return result


def _phases(shape: Shape) -> list[tuple[str, list[tuple[str, dict[str, Any]]], int]]:
    """The loads in order: (label, statements, how often to print progress)."""
    n, steps = shape.instances, shape.steps_per_instance
    span_s = WEEKS * 7 * 86400.0
    spacing = span_s / max(n, 1)
    slices = 8
    edges = [n * k // slices for k in range(slices + 1)]
    finished = [
        (
            INSERT_FINISHED,
            {"first": edges[k] + 1, "last": edges[k + 1], "spacing_s": spacing, "steps": steps},
        )
        for k in range(slices)
        if edges[k + 1] > edges[k]
    ]
    chunks = [f"{digit:x}" for digit in range(CHUNKS)]
    tail_spacing = 2 * 86400.0 / max(shape.tail, 1)
    return [
        ("finished instances", finished, 1),
        (
            "steps and attempts of finished instances",
            [
                (sql, {"steps": steps, "chunk": c})
                for c in chunks
                for sql in (INSERT_FINISHED_STEPS, INSERT_FINISHED_ATTEMPTS)
            ],
            4,
        ),
        ("events of finished instances", [(INSERT_FINISHED_EVENTS, {"steps": steps})], 1),
        ("unfinished instances", [(INSERT_UNFINISHED, {"count": shape.tail, "spacing_s": tail_spacing})], 1),
        (
            "steps of unfinished instances",
            [(INSERT_UNFINISHED_STEPS, {"steps": steps}), (INSERT_UNFINISHED_ATTEMPTS, {"steps": steps})],
            1,
        ),
        ("timers", [(INSERT_TIMERS, {"steps": steps})], 1),
    ]


async def _definitions(conn: psycopg.AsyncConnection[Any]) -> list[Definition]:
    cursor = await conn.execute(CATALOGUE.encode(), {"tables": list(TABLES)})
    return [Definition(*row) for row in await cursor.fetchall()]


async def _rebuild(load: _Loader, definitions: list[Definition], result: Populated) -> None:
    """Build the keys and indexes again, biggest tables first, then the foreign keys."""
    weight = {"step_attempts": 0, "steps": 1, "instances": 2, "events": 3, "timers": 4}
    order = sorted(
        (d for d in definitions if d.kind != "f"), key=lambda d: (weight.get(d.table, 9), "pui".index(d.kind))
    )
    # A table's primary key first: a second index of the same table waits for its lock, so
    # the two connections take different tables where they can.
    started = time.monotonic()
    await load.run("keys and indexes", [(d.create(), {}) for d in order], every=2)
    result.phases_s["keys and indexes"] = time.monotonic() - started
    started = time.monotonic()
    await load.run("foreign keys", [(d.create(), {}) for d in definitions if d.kind == "f"])
    result.phases_s["foreign keys"] = time.monotonic() - started


async def _check_disk(conn: psycopg.AsyncConnection[Any], shape: Shape) -> None:
    """Refuse to start when the server's disk (if it is this machine's) has no room for the load."""
    row = await (await conn.execute("SELECT inet_server_addr()::text")).fetchone()
    if row and row[0] not in (None, "127.0.0.1/32", "::1/128"):
        return  # a remote server: its disk cannot be checked from here
    need = (shape.instances + shape.tail) * BYTES_PER_INSTANCE * shape.steps_per_instance // 10
    free = shutil.disk_usage("/").free
    if free < 2 * need:
        raise RuntimeError(
            f"populate: {free / 2**30:.1f} GiB free on /, the load needs about {need / 2**30:.1f} GiB "
            "(twice that kept free); use fewer --instances"
        )


# ---------------------------------------------------------------- a database of its own


@dataclass(frozen=True)
class BigDatabase:
    """A database of its own on the server of ``base_url``, created migrated and dropped by name."""

    admin_url: str
    name: str
    url: str

    @classmethod
    def new(cls, base_url: str) -> BigDatabase:
        url = make_url(base_url).set(drivername="postgresql")
        name = f"stepline_bigdb_{uuid.uuid4().hex[:8]}"
        return cls(
            admin_url=url.set(database="postgres").render_as_string(hide_password=False),
            name=name,
            url=url.set(database=name).render_as_string(hide_password=False),
        )

    def create(self, revision: str = "head") -> None:
        """Create the database and migrate it (to ``revision``: an older one to measure before an index)."""
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{self.name}"'.encode())
        if revision == "head":
            stores.upgrade(self.url)
        else:
            upgrade_postgres(self.url, revision)

    def drop(self) -> None:
        """Drop the database, closing what is still connected; never raises."""
        try:
            with psycopg.connect(self.admin_url, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)'.encode())
        except psycopg.Error as exc:
            print(f"bigdb: could not drop database {self.name}: {exc}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bigdb",
        description="Create a database of its own and fill it with a big history (see the module's doc).",
    )
    parser.add_argument(
        "--instances", type=int, default=1_000_000, help="finished instances (default 1,000,000)"
    )
    parser.add_argument("--steps", type=int, default=10, help="steps per finished instance (default 10)")
    parser.add_argument("--unfinished", type=int, default=None, help="unfinished instances (default 5%%)")
    parser.add_argument("--revision", default="head", help="migrate to this revision first (default head)")
    parser.add_argument("--keep-bigdb", action="store_true", help="keep the database (its URL is printed)")
    args = parser.parse_args(argv)
    base = os.environ.get("STEPLINE_DATABASE_URL") or "postgresql://postgres@127.0.0.1:5432/stepline"
    big = BigDatabase.new(base)
    print(f"bigdb: database {big.name}")
    try:
        big.create(args.revision)
        asyncio.run(populate(big.url, args.instances, args.steps, unfinished=args.unfinished))
    except KeyboardInterrupt:
        print("bigdb: interrupted")
        big.drop()
        return 1
    except BaseException:
        big.drop()
        raise
    if args.keep_bigdb:
        print(f"bigdb: kept {big.url}")
    else:
        big.drop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
