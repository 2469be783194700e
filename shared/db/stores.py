"""Pick the store (and the migration) a database URL calls for: PostgreSQL, or SQLite when embedded."""

from __future__ import annotations

from typing import TYPE_CHECKING

from stepline.shared.db.engine import Clock, create_engine, is_sqlite
from stepline.shared.process import process_name

if TYPE_CHECKING:
    from stepline.shared.db.store import Store
    from stepline.shared.settings import DatabaseSettings


def create_store(
    database_url: str,
    *,
    pool_size: int = 10,
    max_connections: int | None = None,
    pre_ping: bool = True,
    pgbouncer: bool = False,
    application_name: str | None = None,
    held: int = 0,
    commit_batch: int = 1,
    clock: Clock | None = None,
) -> Store:
    """The store of ``database_url``, owning an engine built by ``stepline.shared.db.engine.create_engine``.

    ``max_connections``: the process's bound on its PostgreSQL connections
    (``pool_size`` and as many again at peaks without it); ``held``: on
    PostgreSQL, how many autocommit connections to keep checked out for the
    one-statement operations (a worker keeps one per concurrent step), at most
    ``max_connections - 2`` so that its other work always finds one;
    ``commit_batch``: on PostgreSQL, how many concurrent steps' commits may go
    in one transaction (``stepline.shared.db.group_commit``; 1: each alone);
    ``application_name``: the process's name in ``pg_stat_activity``;
    ``clock``: an SQLite database's clock (the testing kit's virtual time).
    """
    engine = create_engine(
        database_url,
        pool_size=pool_size,
        max_connections=max_connections,
        pre_ping=pre_ping,
        pgbouncer=pgbouncer,
        application_name=application_name,
        clock=clock,
    )
    if max_connections is not None:
        held = max(0, min(held, max_connections - 2))
    # Each store's module is imported for its own database: an embedded `stepline status`
    # never loads psycopg, and one on PostgreSQL never loads the SQLite store.
    if is_sqlite(database_url):
        from stepline.shared.db.store_sqlite import SqliteStore

        return SqliteStore(engine)
    from stepline.shared.db.store_postgres import PostgresStore

    return PostgresStore(engine, held=held, commit_batch=commit_batch)


def create_store_for(
    database_url: str,
    db: DatabaseSettings,
    process: str,
    *,
    connections: int,
    pre_ping: bool = True,
    held: int = 0,
    commit_batch: int = 1,
    process_id: str | None = None,
) -> Store:
    """The store of one Stepline process: the one way every command, the client and the dashboard build it.

    ``db`` (``STEPLINE_DATABASE__*``) bounds its connections (``connections``,
    the process's own default, when it sets none) and says whether PgBouncer is
    in between. ``process`` and ``process_id`` (default ``host:pid``) name it in
    ``pg_stat_activity`` (``stepline-worker host:1234``), so that an operator
    counts each process's connections against its budget. ``pre_ping`` and
    ``held`` and ``commit_batch`` are as for ``create_store``.
    """
    return create_store(
        database_url,
        max_connections=db.budget(connections),
        pre_ping=pre_ping,
        pgbouncer=db.pgbouncer,
        application_name=process_name(process, process_id),
        held=held,
        commit_batch=commit_batch,
    )


def upgrade(database_url: str, revision: str = "head") -> None:
    """Bring the database to ``revision`` (default: the newest); safe to repeat.

    PostgreSQL is migrated by Alembic; the embedded SQLite file is created whole
    at the newest revision (see ``migrate.create_embedded``).
    """
    from stepline.shared.db import migrate  # Alembic: only a command that migrates pays for it

    if is_sqlite(database_url):
        migrate.create_embedded(database_url)
        return
    migrate.upgrade_postgres(database_url, revision)


__all__ = ["create_store", "create_store_for", "upgrade"]
