"""One instance and its steps, read from PostgreSQL on a plain psycopg connection: no SQLAlchemy.

``stepline status ID`` reads two rows' worth of data, yet importing SQLAlchemy (its
engine, its ORM and ``ext.asyncio``) cost more than half of the command's time (issue
23). Here the two statements of ``Client.get`` (``read_statements.instance_row_query``
and ``step_rows_query``) run as PostgreSQL receives them from SQLAlchemy: the texts
below are those statements compiled for psycopg, and ``tests/unit/test_plain_read.py``
checks them word for word, so the queries keep one definition (there).

Only the plain case is read here; the caller reads through the store whenever
``read_instance_rows`` raises ``NotPlain``: a URL libpq cannot take as it is (the
SQLAlchemy host-list form, ``?pgbouncer=``), or any error of the database or the
connection, which the store then meets again and words as every command does.
"""

from __future__ import annotations

from typing import Any

from stepline.shared.db.libpq_rules import LIBPQ_SCHEMES, PGBOUNCER_FLAG, application_name_of
from stepline.shared.states import StepKind

INSTANCE_ROW = (
    "SELECT instances.id, instances.workflow, instances.status, instances.params, instances.output, "
    "instances.error, instances.trace_context, instances.version, instances.created_at, "
    "instances.updated_at, instances.finished_at, instances.parent_id, instances.parent_workflow, "
    "instances.parent_step, instances.parent_occurrence, instances.build_id, instances.priority, "
    "instances.concurrency_key, instances.concurrency_limit \n"
    "FROM instances \n"
    "WHERE instances.id = %(id_1)s::VARCHAR"
)
"""``instance_row_query`` compiled for psycopg."""

STEP_ROWS = (
    "SELECT steps.instance_id, steps.name, steps.occurrence, steps.position, steps.kind, steps.status, "
    "steps.attempt, steps.result, steps.error, steps.fire_at, steps.detail, steps.started_at, "
    "steps.finished_at, steps.updated_at, steps.heartbeat, steps.heartbeat_at, steps.version \n"
    "FROM steps \n"
    "WHERE steps.instance_id = %(instance_id_1)s::VARCHAR AND steps.kind != %(kind_1)s::VARCHAR "
    "ORDER BY steps.position"
)
"""``step_rows_query`` compiled for psycopg."""


class NotPlain(Exception):
    """This read cannot be made here; read through the store (and meet its error there, if any)."""


def instance_row_params(instance_id: str) -> dict[str, Any]:
    """``INSTANCE_ROW``'s parameters, as SQLAlchemy binds them."""
    return {"id_1": instance_id}


def step_rows_params(instance_id: str) -> dict[str, Any]:
    """``STEP_ROWS``'s parameters, as SQLAlchemy binds them."""
    return {"instance_id_1": instance_id, "kind_1": StepKind.VALUE}


CONNECT_TIMEOUT_S = 5
"""How long the plain read waits to connect (unless the URL says): past it, the client tries.

Without it a server that never answers would cost libpq's default wait twice, once here
and once through the client, which then words the error as every command does.
"""


def conninfo(database_url: str) -> str:
    """The URL as libpq takes it, which is the URL itself when it is a plain ``postgresql://`` one.

    Raises:
        NotPlain: another scheme; query options that ``engine.driver_url`` rewrites first; or a
            ``+`` in the query, which SQLAlchemy reads as a space and libpq does not.
    """
    scheme, _, rest = database_url.partition("://")
    _, _, query = rest.partition("?")
    if scheme not in LIBPQ_SCHEMES or "+" in query or _options(database_url) & {"host", PGBOUNCER_FLAG}:
        raise NotPlain("not a URL libpq takes as it is")
    return database_url


def _options(database_url: str) -> set[str]:
    """The names of the URL's query options."""
    query = database_url.partition("://")[2].partition("?")[2]
    return {option.partition("=")[0] for option in query.split("&") if option}


def read_instance_rows(
    database_url: str, application_name: str, instance_id: str
) -> tuple[Any, list[Any]] | None:
    """The instance row and its step rows (attribute access, as SQLAlchemy's rows), or None if there is none.

    One autocommit connection, no server-side prepared statements (PgBouncer-safe), closed after;
    at most ``CONNECT_TIMEOUT_S`` to connect, unless the URL sets ``connect_timeout``.

    Raises:
        NotPlain: as ``conninfo``; or the database or the connection failed.
    """
    url = conninfo(database_url)  # first: an embedded store (SQLite) never loads the PostgreSQL driver
    import psycopg
    from psycopg.rows import namedtuple_row

    given = _options(url)
    extra: dict[str, Any] = {} if "connect_timeout" in given else {"connect_timeout": CONNECT_TIMEOUT_S}
    if "application_name" not in given:  # named as engine.create_engine names a connection
        extra["application_name"] = application_name_of(application_name)
    try:
        with psycopg.connect(
            url, autocommit=True, prepare_threshold=None, row_factory=namedtuple_row, **extra
        ) as conn:
            row = conn.execute(INSTANCE_ROW, instance_row_params(instance_id)).fetchone()
            if row is None:
                return None
            return row, conn.execute(STEP_ROWS, step_rows_params(instance_id)).fetchall()
    except (psycopg.Error, OSError) as exc:
        raise NotPlain(str(exc)) from exc


__all__ = ["INSTANCE_ROW", "STEP_ROWS", "NotPlain", "conninfo", "read_instance_rows"]
