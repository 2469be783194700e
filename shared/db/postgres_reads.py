"""PostgreSQL's read-only statements: histories as one JSON array of steps per instance, and the id collation.

``PostgresTransaction`` binds them to its connection (``stepline.shared.db.store_postgres``).
"""

from __future__ import annotations

from collections import namedtuple
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.dialects.postgresql import aggregate_order_by

from stepline.shared.db.schema import instances, steps, timers, utc_now
from stepline.shared.db.statements import INSTANCE_FIELDS, STEP_FIELDS, changed_since
from stepline.shared.states import UNFINISHED_STATUSES


def _step_list(*conditions: sa.ColumnElement[bool]) -> sa.ScalarSelect[Any]:
    """An instance's steps (those meeting ``conditions``) as one JSON array, in position order."""
    step_object = sa.func.json_build_object(*(part for name in STEP_FIELDS for part in (name, steps.c[name])))
    return (
        sa.select(sa.func.json_agg(aggregate_order_by(step_object, steps.c.position)))
        .where(steps.c.instance_id == instances.c.id, *conditions)
        .scalar_subquery()
    )


def _changes_query() -> sa.Select[Any]:
    """PostgreSQL: the instance, its steps changed since a version, and its count of steps: one round trip."""
    count = sa.select(sa.func.count()).where(steps.c.instance_id == instances.c.id).scalar_subquery()
    since = sa.bindparam("since", type_=steps.c.version.type)
    return sa.select(
        *INSTANCE_FIELDS, _step_list(changed_since(since)).label("steps"), count.label("step_count")
    ).where(instances.c.id == sa.bindparam("instance_id"))


def _history_query() -> sa.Select[Any]:
    """PostgreSQL: the instance and its steps as one JSON array, in one round trip."""
    return sa.select(*INSTANCE_FIELDS, _step_list().label("steps")).where(
        instances.c.id == sa.bindparam("instance_id")
    )


def _unfinished_histories_query() -> sa.Select[Any]:
    """PostgreSQL: a page of unfinished instances with their steps, in one round trip.

    Arrays instead of IN lists: the statement has one fixed text, compiled once.
    ``after`` is ``''`` for the first page (ids are never empty).
    """
    # IN the unfinished statuses (one small index range each), not != ALL of the finished ones (every
    # finished instance read); each status a literal bound once, so the text stays fixed.
    unfinished = [sa.literal(status.value, instances.c.status.type) for status in UNFINISHED_STATUSES]
    return (
        sa.select(*INSTANCE_FIELDS, _step_list().label("steps"))
        .where(
            instances.c.status.in_(unfinished),
            instances.c.workflow == sa.any_(sa.bindparam("workflows", type_=postgresql.ARRAY(sa.Text))),
            instances.c.id > sa.bindparam("after", type_=sa.Text),
        )
        .order_by(instances.c.id)
        .limit(sa.bindparam("limit", type_=sa.Integer))
    )


HISTORY = _history_query()  # built once: its compiled form is reused
UNFINISHED_HISTORIES = _unfinished_histories_query()
CHANGES = _changes_query()
ChangesRow = namedtuple("ChangesRow", list(CHANGES.selected_columns.keys()))  # type: ignore[misc]
# Its row as raw.fetch_all gives it (a tuple), with the names SQLAlchemy's rows have.
HistoryRow = namedtuple("HistoryRow", list(HISTORY.selected_columns.keys()))  # type: ignore[misc]

# The provider and the locale of instances.id's collation ("default" is the database's).
# datlocprovider is read through to_jsonb because it only exists from PostgreSQL 15 on;
# before, every collation was libc's ('c').


ID_COLLATION = sa.text(
    """
    SELECT CASE WHEN c.collprovider = 'd' THEN coalesce(to_jsonb(d) ->> 'datlocprovider', 'c')
                ELSE c.collprovider::text END AS provider,
           CASE WHEN c.collprovider = 'd' THEN d.datcollate::text
                ELSE c.collcollate::text END AS locale
    FROM pg_attribute a
    JOIN pg_collation c ON c.oid = a.attcollation
    JOIN pg_database d ON d.datname = current_database()
    WHERE a.attrelid = 'instances'::regclass AND a.attname = 'id'
    """
)
# libc's C and POSIX compare bytes; glibc's C.UTF-8 (2.35 on, and Debian's before) compares
# code points; PostgreSQL 17's builtin provider ('b') has only code point order locales.


CODE_POINT_LOCALES = frozenset({"c", "posix", "c.utf8", "c.utf-8"})


def sorts_by_code_point(provider: str, locale: str | None) -> bool:
    """Whether a collation (``ID_COLLATION``'s row) sorts by code point, so a prefix is one index range."""
    if provider == "b":
        return True
    return provider == "c" and (locale or "").lower() in CODE_POINT_LOCALES


def next_timer_query() -> sa.Select[Any]:
    """Seconds until the earliest armed timer is due, by the database's clock (NULL: none)."""
    return sa.select(sa.func.extract("epoch", sa.func.min(timers.c.fire_at) - utc_now()))
