"""Every table Stepline keeps, declared once; migrations must produce exactly this."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.functions import FunctionElement

from stepline.shared.db.engine import SQLITE_CLOCK, sqlite_time_text

metadata = sa.MetaData()

Json = sa.JSON().with_variant(JSONB(), "postgresql")


class _NaiveUtc(sa.TypeDecorator[datetime]):
    """SQLite's form of a timestamp: naive UTC text to the millisecond, ``YYYY-MM-DD HH:MM:SS.fff``.

    SQLite has no time zones and compares times as text. Its own clock
    (``strftime('%Y-%m-%d %H:%M:%f')``, the column defaults) writes three digits
    of fraction, so every bound time is written the same way here, where the
    store binds parameters: a bound time with six digits would compare later
    than the same moment stored by a default, and a keyset page would show its
    last row again, or skip the rows created in the same millisecond.
    """

    impl = sa.DateTime()
    cache_ok = True

    def bind_processor(self, dialect: sa.Dialect) -> Callable[[datetime | None], str | None]:
        return sqlite_time_text


# PostgreSQL keeps timestamptz; SQLite (the embedded mode) the naive UTC above.
_STORED_TIMESTAMP = sa.DateTime(timezone=True).with_variant(_NaiveUtc(), "sqlite")


class Timestamp(sa.TypeDecorator[datetime]):
    """A point in time, always handed back as an aware UTC datetime.

    Stored as ``_STORED_TIMESTAMP`` says for each database; a naive value read
    back (SQLite's) is made aware again on the way out.
    """

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def load_dialect_impl(self, dialect: sa.Dialect) -> sa.types.TypeEngine[Any]:
        return _STORED_TIMESTAMP  # the variant for the dialect is resolved by SQLAlchemy

    def process_result_value(self, value: Any, dialect: sa.Dialect) -> datetime | None:
        if isinstance(value, datetime) and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value  # type: ignore[no-any-return]


# SQLite numbers rows itself only in an INTEGER PRIMARY KEY column.
Serial = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


class _Now(FunctionElement[datetime]):
    type = Timestamp()
    inherit_cache = True
    name = "utc_now"


class _Clock(FunctionElement[datetime]):
    type = Timestamp()
    inherit_cache = True
    name = "utc_clock"


class _NowPlus(FunctionElement[datetime]):
    type = Timestamp()
    inherit_cache = True
    name = "utc_now_plus"


def utc_now(offset: timedelta | None = None) -> FunctionElement[datetime]:
    """The database's clock, optionally shifted: ``utc_now()``, ``utc_now(timedelta(seconds=30))``.

    Timers and time-outs use the database's clock, never a worker's, so clock
    skew between machines cannot fire a timer early. PostgreSQL's ``now()``
    is the transaction's start; SQLite's clock is read to the millisecond, in
    the text form SQLAlchemy stores datetimes in, so the two compare correctly.
    """
    if offset is None:
        return _Now()
    return _NowPlus(sa.literal(offset.total_seconds(), sa.Float()))


def utc_clock() -> FunctionElement[datetime]:
    """The database's clock when the row is written, not when its transaction began.

    For an age that must not start early: an outbox row written at the end of
    a transaction that waited for a lock or replayed workflow code for seconds
    would otherwise be born older than the sweepers' grace, and be republished
    while the fast path still publishes it. PostgreSQL's ``clock_timestamp()``
    (read per row; no extra round trip); SQLite reads its clock once per
    statement, which is already the time of the write, so it is ``utc_now()`` there.
    """
    return _Clock()


class _DefaultNow(FunctionElement[datetime]):
    type = Timestamp()
    inherit_cache = True
    name = "default_now"


# A column default runs on any connection, including those that do not add the engine's
# clock function: the real clock, in the same text form.
_DEFAULT_NOW = _DefaultNow()
_SQLITE_TEXT = "'%Y-%m-%d %H:%M:%f'"


@compiles(_Now)
@compiles(_DefaultNow)
def _now_postgresql(element: _Now, compiler: SQLCompiler, **kw: Any) -> str:
    return "now()"


@compiles(_Now, "sqlite")
def _now_sqlite(element: _Now, compiler: SQLCompiler, **kw: Any) -> str:
    return f"{SQLITE_CLOCK}()"  # the engine's clock (stepline.shared.db.engine): real, or the testing kit's


@compiles(_DefaultNow, "sqlite")
def _default_now_sqlite(element: _DefaultNow, compiler: SQLCompiler, **kw: Any) -> str:
    return f"strftime({_SQLITE_TEXT}, 'now')"


@compiles(_Clock)
def _clock_postgresql(element: _Clock, compiler: SQLCompiler, **kw: Any) -> str:
    return "clock_timestamp()"


@compiles(_Clock, "sqlite")
def _clock_sqlite(element: _Clock, compiler: SQLCompiler, **kw: Any) -> str:
    return f"strftime({_SQLITE_TEXT}, 'now')"  # per statement already; a column default too


@compiles(_NowPlus)
def _now_plus_postgresql(element: _NowPlus, compiler: SQLCompiler, **kw: Any) -> str:
    return f"(now() + make_interval(secs => {compiler.process(element.clauses, **kw)}))"


@compiles(_NowPlus, "sqlite")
def _now_plus_sqlite(element: _NowPlus, compiler: SQLCompiler, **kw: Any) -> str:
    return (
        f"strftime({_SQLITE_TEXT}, {SQLITE_CLOCK}(), {compiler.process(element.clauses, **kw)} || ' seconds')"
    )


instances = sa.Table(
    "instances",
    metadata,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("workflow", sa.Text, nullable=False),
    sa.Column("status", sa.Text, nullable=False),
    sa.Column("params", Json),
    sa.Column("output", Json),
    sa.Column("error", Json),
    sa.Column("trace_context", Json),
    # Bumped by every transaction that changes the history; a worker that replayed
    # an older version must reload before it plans what comes next.
    sa.Column("version", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("created_at", Timestamp(), nullable=False, server_default=_DEFAULT_NOW),
    sa.Column("updated_at", Timestamp(), nullable=False, server_default=_DEFAULT_NOW),
    sa.Column("finished_at", Timestamp()),
    # A child workflow knows the parent step that waits for it.
    sa.Column("parent_id", sa.Text),
    sa.Column("parent_workflow", sa.Text),
    sa.Column("parent_step", sa.Text),
    sa.Column("parent_occurrence", sa.Integer),
    # The build id of the worker that started it (None before revision 0005, and in the testing kit).
    sa.Column("build_id", sa.Text),
    # Flow control (revision 0006): 0-9, higher first among queued instances (Producer.start(priority=)).
    sa.Column("priority", sa.SmallInteger, nullable=False, server_default="0"),
    # The instance's key under its workflow's Concurrency limit ("" for one limit over the
    # workflow), and that limit as the code that took the start declared it. Both NULL for a
    # workflow without a limit: such instances stay out of the index below and pay nothing.
    sa.Column("concurrency_key", sa.Text),
    sa.Column("concurrency_limit", sa.Integer),
    sa.Index("ix_instances_workflow_status_created", "workflow", "status", "created_at"),
    sa.Index("ix_instances_status_created", "status", "created_at"),
    sa.Index("ix_instances_created", "created_at"),
    sa.Index("ix_instances_parent", "parent_id"),
    sa.Index("ix_instances_finished", "finished_at"),
    # Revision 0009: counts per workflow of the unfinished statuses, one small range per status.
    sa.Index("ix_instances_status_workflow", "status", "workflow"),
)

# Revision 0009, for a big database: the instance list of one build or one workflow in the
# list's own order (newest first, then id), so that the planner reads just the page. With
# (build_id, created_at) alone the planner walked the created_at index back to an old
# build's rows (1.4 s with a million instances), guessing its rows spread over all time.
sa.Index("ix_instances_build_created", instances.c.build_id, instances.c.created_at.desc(), instances.c.id)
sa.Index("ix_instances_workflow_created", instances.c.workflow, instances.c.created_at.desc(), instances.c.id)

# Serves both questions of a concurrency key (stepline.shared.slots): how many of (workflow, key)
# hold a slot (status running, waiting or paused), and which queued one is next (priority
# first, then oldest). Partial: instances of workflows without a limit are not in it.
sa.Index(
    "ix_instances_concurrency",
    instances.c.workflow,
    instances.c.concurrency_key,
    instances.c.status,
    instances.c.priority.desc(),
    instances.c.created_at,
    postgresql_where=instances.c.concurrency_key.is_not(None),
    sqlite_where=instances.c.concurrency_key.is_not(None),
)

_STEP_CHANGE_VERSION = (
    sa.select(instances.c.version + 1)
    .where(instances.c.id == sa.literal_column("steps.instance_id"))
    .scalar_subquery()
)
"""What an UPDATE of a step row sets ``steps.version`` to: its instance's version, plus one.

Read in the statement's snapshot: under the instance lock (or in the one statement
that bumps the version it checked) that is the version the write commits at, or
above it when the version was bumped earlier in the transaction; never below it.
"""

steps = sa.Table(
    "steps",
    metadata,
    sa.Column("instance_id", sa.Text, sa.ForeignKey("instances.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("name", sa.Text, primary_key=True),
    sa.Column("occurrence", sa.Integer, primary_key=True),
    sa.Column("position", sa.Integer, nullable=False),
    sa.Column("kind", sa.Text, nullable=False),
    sa.Column("status", sa.Text, nullable=False),
    # The fencing token: only a message carrying the current attempt may commit.
    sa.Column("attempt", sa.Integer, nullable=False, server_default="1"),
    sa.Column("result", Json),
    sa.Column("error", Json),
    sa.Column("fire_at", Timestamp()),
    # What a wait waits for: {"event_type": ...} or {"child_id": ..., "workflow": ...}.
    sa.Column("detail", Json),
    sa.Column("started_at", Timestamp()),
    sa.Column("finished_at", Timestamp()),
    sa.Column("updated_at", Timestamp(), nullable=False, server_default=_DEFAULT_NOW),
    # Revision 0012, long steps (heartbeat_timeout=): the details of the last heartbeat any
    # attempt sent, and when (the database's clock); the next attempt reads them to resume.
    sa.Column("heartbeat", Json),
    sa.Column("heartbeat_at", Timestamp()),
    # Revision 0018: the instance version this row last changed at (NULL: written before it).
    # Every UPDATE of a step sets it to its instance's version plus one (the onupdate below:
    # no writer can forget it); an INSERT sets it explicitly (statements.steps_insert, the
    # one-statement commits). A worker catches a kept history up by reading only the rows
    # changed since its version (Transaction.load_changes).
    sa.Column("version", sa.BigInteger, onupdate=_STEP_CHANGE_VERSION),
)

step_attempts = sa.Table(
    "step_attempts",
    metadata,
    sa.Column("instance_id", sa.Text, primary_key=True),
    sa.Column("name", sa.Text, primary_key=True),
    sa.Column("occurrence", sa.Integer, primary_key=True),
    sa.Column("attempt", sa.Integer, primary_key=True),
    sa.Column("worker", sa.Text, nullable=False),
    sa.Column("outcome", sa.Text, nullable=False),
    sa.Column("error", Json),
    sa.Column("started_at", Timestamp(), nullable=False),
    sa.Column("finished_at", Timestamp(), nullable=False),
    # The build id of the worker that ran it: steps of one instance may run on several builds.
    sa.Column("build_id", sa.Text),
    # When the next attempt is due, for a failure that is retried (the back-off, or the
    # step's own RetryAfter): the retry timer's fire_at, kept after the timer fired.
    sa.Column("retry_at", Timestamp()),
    sa.ForeignKeyConstraint(
        ["instance_id", "name", "occurrence"],
        ["steps.instance_id", "steps.name", "steps.occurrence"],
        ondelete="CASCADE",
    ),
    # Revision 0009: the dashboard's chart of the last hour (attempts per minute by outcome)
    # reads an index-only range instead of every attempt ever run. A row is written once,
    # finished, so this costs one index entry per attempt and never an update.
    sa.Index("ix_step_attempts_finished", "finished_at", "outcome"),
)

outbox = sa.Table(
    "outbox",
    metadata,
    sa.Column("id", Serial, sa.Identity(), primary_key=True),
    sa.Column("routing_key", sa.Text, nullable=False),
    sa.Column("body", sa.LargeBinary, nullable=False),
    sa.Column("headers", Json),
    # When the row was written, or last refreshed by a relay that holds it while it publishes it
    # or runs its step itself (OutboxRelay.hold): sweepers republish rows older than sweep_after.
    # The clock at the write, not the transaction's start (see utc_clock).
    sa.Column("created_at", Timestamp(), nullable=False, server_default=utc_clock()),
)

# Armed timers only: firing one deletes its row in the statement that queues its
# message in the outbox (Transaction.fire_due_timers in stepline.shared.db.store), so the due index holds
# just what is still to fire, and a fire writes no new row version of the timer.
timers = sa.Table(
    "timers",
    metadata,
    sa.Column("id", Serial, sa.Identity(), primary_key=True),
    sa.Column("instance_id", sa.Text, sa.ForeignKey("instances.id", ondelete="CASCADE"), nullable=False),
    sa.Column("step", sa.Text, nullable=False),
    sa.Column("occurrence", sa.Integer, nullable=False),
    sa.Column("attempt", sa.Integer, nullable=False),
    sa.Column("kind", sa.Text, nullable=False),
    sa.Column("fire_at", Timestamp(), nullable=False),
    # The wake-up message, built by the worker that armed the timer: the scheduler
    # moves it to the outbox without knowing what it means.
    sa.Column("routing_key", sa.Text, nullable=False),
    sa.Column("body", sa.LargeBinary, nullable=False),
    sa.Column("headers", Json),
    sa.Column("created_at", Timestamp(), nullable=False, server_default=_DEFAULT_NOW),
    # One armed timer per step attempt: arming it again keeps the first.
    sa.UniqueConstraint("instance_id", "step", "occurrence", "attempt", "kind"),
    sa.Index("ix_timers_due", "fire_at"),
)

events = sa.Table(
    "events",
    metadata,
    sa.Column("id", Serial, sa.Identity(), primary_key=True),
    sa.Column("instance_id", sa.Text, sa.ForeignKey("instances.id", ondelete="CASCADE"), nullable=False),
    # Given by the sender (or a new UUID): a redelivered event is stored once.
    sa.Column("event_id", sa.Text, nullable=False),
    sa.Column("event_type", sa.Text, nullable=False),
    sa.Column("payload", Json),
    sa.Column("created_at", Timestamp(), nullable=False, server_default=_DEFAULT_NOW),
    sa.Column("consumed_step", sa.Text),
    sa.Column("consumed_occurrence", sa.Integer),
    sa.Column("consumed_at", Timestamp()),
    sa.UniqueConstraint("instance_id", "event_id"),
    sa.Index(
        "ix_events_waiting",
        "instance_id",
        "event_type",
        "id",
        postgresql_where=sa.text("consumed_at IS NULL"),
        sqlite_where=sa.text("consumed_at IS NULL"),
    ),
)

# Payloads stored apart: a step result, params or an event payload over STEPLINE_PAYLOAD__OFFLOAD_ABOVE
# is written here once, zlib-compressed (sealed first if a codec is set), and its row or message holds
# {"$payload": id, "bytes": n}. Each row belongs to the instance whose id it carries: a client writes a
# start's params before the instance exists, so there is no foreign key. Pruning the instance deletes
# its payloads; a prune also deletes the rows older than its age whose instance never came to be.
payloads = sa.Table(
    "payloads",
    metadata,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("instance_id", sa.Text, nullable=False),
    sa.Column("size", sa.BigInteger, nullable=False),
    sa.Column("data", sa.LargeBinary, nullable=False),
    sa.Column("created_at", Timestamp(), nullable=False, server_default=_DEFAULT_NOW),
    sa.Index("ix_payloads_instance", "instance_id"),
)

# Schedules: one row each, declared in code (synced when a worker starts) or made at run time.
# Firing a tick claims the row (SKIP LOCKED), queues its start message in the outbox and moves
# next_fire_at on, in one transaction: a tick starts one instance, whichever scheduler fires it.
schedules = sa.Table(
    "schedules",
    metadata,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("workflow", sa.Text, nullable=False),
    sa.Column("cron", sa.Text, nullable=False),
    sa.Column("timezone", sa.Text, nullable=False),
    sa.Column("params", Json),
    sa.Column("overlap", sa.Text, nullable=False),
    sa.Column("catch_up", sa.Text, nullable=False),
    # "code" (declared with @workflow, owned by the workers' sync) or "runtime" (Client, CLI).
    sa.Column("source", sa.Text, nullable=False),
    sa.Column("paused", sa.Boolean, nullable=False, server_default=sa.false()),
    # The earliest tick not yet fired (or skipped).
    sa.Column("next_fire_at", Timestamp(), nullable=False),
    # When a scheduler must look at the row next: next_fire_at, or sooner while a tick is buffered.
    sa.Column("due_at", Timestamp(), nullable=False),
    # overlap="buffer-one": the tick kept until the previous instance finishes.
    sa.Column("buffered_tick", Timestamp()),
    # The last instance this schedule started, and when (overlap looks at it).
    sa.Column("last_instance_id", sa.Text),
    sa.Column("last_started_at", Timestamp()),
    sa.Column("created_at", Timestamp(), nullable=False, server_default=_DEFAULT_NOW),
    sa.Column("updated_at", Timestamp(), nullable=False, server_default=_DEFAULT_NOW),
    sa.Index(
        "ix_schedules_due",
        "due_at",
        postgresql_where=sa.text("NOT paused"),
        sqlite_where=sa.text("NOT paused"),
    ),
)

# Step limits (stepline.shared.limits; docs/flow-control.md, "Step limits"). One row per
# (kind, key): the row every acquire, release and grant of the key locks first, so they
# take turns. A rate key keeps its token bucket here (``tokens`` as of ``refilled_at``);
# ``wake_at`` is when the scheduler must grant the next waiter of a rate key its token.
limit_keys = sa.Table(
    "limit_keys",
    metadata,
    sa.Column("kind", sa.Text, primary_key=True),
    sa.Column("key", sa.Text, primary_key=True),
    # The limit (and period) of the step that asked last: steps of one key should agree.
    sa.Column("limit", sa.Integer, nullable=False),
    sa.Column("period_s", sa.Float),
    sa.Column("tokens", sa.Float, nullable=False, server_default="0"),
    sa.Column("refilled_at", Timestamp(), nullable=False, server_default=_DEFAULT_NOW),
    sa.Column("wake_at", Timestamp()),
    # A concurrency key's holds and waiting steps, counted on its row: the one-statement
    # take and give-back read them there (see stepline.shared.db.limits); every locked
    # change recounts them.
    sa.Column("in_use", sa.Integer, nullable=False, server_default="0"),
    sa.Column("waiters", sa.Integer, nullable=False, server_default="0"),
    sa.Index("ix_limit_keys_wake", "wake_at"),
)

# What an attempt holds: a concurrency slot while it runs, or a rate token granted to a
# waiter and not yet taken by its attempt. One per step and key: a newer attempt of the
# step takes the row over (the attempt number fences a stale one out). ``lease_until``
# is renewed while the attempt runs; the scheduler reclaims a lapsed one. No foreign
# key: a hold outlives a deleted instance until its lease lapses, so that the key's
# count goes down with it (a cascade would delete it behind the key's back).
limit_holds = sa.Table(
    "limit_holds",
    metadata,
    sa.Column("kind", sa.Text, primary_key=True),
    sa.Column("key", sa.Text, primary_key=True),
    sa.Column("instance_id", sa.Text, primary_key=True),
    sa.Column("step", sa.Text, primary_key=True),
    sa.Column("occurrence", sa.Integer, primary_key=True),
    sa.Column("attempt", sa.Integer, nullable=False),
    sa.Column("lease_until", Timestamp(), nullable=False),
    sa.Index("ix_limit_holds_lease", "lease_until"),
    sa.Index("ix_limit_holds_instance", "instance_id"),
)

# Steps waiting for a limit, one row each, on the key that blocks them: ``id`` is the
# step's place in line (FIFO per key), kept when it waits again. The step's message is
# stored with it, so whoever frees the key (a worker, a terminate, the scheduler) queues it.
limit_waiters = sa.Table(
    "limit_waiters",
    metadata,
    sa.Column("id", Serial, sa.Identity(), primary_key=True),
    sa.Column("kind", sa.Text, nullable=False),
    sa.Column("key", sa.Text, nullable=False),
    sa.Column("instance_id", sa.Text, sa.ForeignKey("instances.id", ondelete="CASCADE"), nullable=False),
    sa.Column("step", sa.Text, nullable=False),
    sa.Column("occurrence", sa.Integer, nullable=False),
    sa.Column("attempt", sa.Integer, nullable=False),
    sa.Column("routing_key", sa.Text, nullable=False),
    sa.Column("body", sa.LargeBinary, nullable=False),
    sa.Column("headers", Json),
    sa.Column("since", Timestamp(), nullable=False, server_default=_DEFAULT_NOW),
    sa.UniqueConstraint("instance_id", "step", "occurrence"),
    sa.Index("ix_limit_waiters_line", "kind", "key", "id"),
)
