"""Apply the Alembic migrations that live beside the schema."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, text
from sqlalchemy.exc import OperationalError, ProgrammingError
from sqlalchemy.ext.asyncio import AsyncEngine

from shared.db.engine import driver_url, is_sqlite, sqlite_path
from shared.db.schema import metadata
from shared.errors import StorageError

MIGRATIONS = Path(__file__).with_name("migrations")


def alembic_config(database_url: str) -> Config:
    """An Alembic config pointing at our migrations and the given database."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["sqlalchemy_url"] = driver_url(database_url)
    return config


def upgrade(database_url: str, revision: str = "head") -> None:
    """Bring the database to ``revision`` (default: the newest); safe to repeat."""
    if is_sqlite(database_url):
        _create_embedded(database_url)
        return
    command.upgrade(alembic_config(database_url), revision)


def _create_embedded(database_url: str) -> None:
    """Create the embedded mode's tables from the schema, stamped with the newest revision.

    The embedded state is for development: it is made whole at the newest
    revision rather than migrated, and a file left by an older release says so.
    """
    sqlite_path(database_url).parent.mkdir(parents=True, exist_ok=True)
    found = current_revision(database_url)
    needed = head_revision()
    if found == needed:
        return
    if found is not None:
        raise StorageError(
            f"the embedded state {sqlite_path(database_url)} is at schema revision {found}, this code "
            f"needs {needed}: it was made by another Stepline release; move it away to start afresh"
        )
    engine = create_engine(driver_url(database_url, asynchronous=False))
    try:
        with engine.begin() as connection:
            metadata.create_all(connection)
            MigrationContext.configure(connection).stamp(
                ScriptDirectory.from_config(alembic_config(database_url)), "head"
            )
    finally:
        engine.dispose()


def current_revision(database_url: str) -> str | None:
    """The revision the database is at, or None if it was never migrated."""
    engine = create_engine(driver_url(database_url, asynchronous=False))
    try:
        with engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()
    finally:
        engine.dispose()


def head_revision() -> str | None:
    """The newest revision shipped with this code."""
    return ScriptDirectory.from_config(alembic_config("postgresql://unused/")).get_current_head()


async def database_answers(engine: AsyncEngine) -> bool:
    """Whether the database answers a trivial query now."""
    async with engine.connect() as conn:
        await conn.execute(text("SELECT 1"))
    return True


async def check_schema(engine: AsyncEngine) -> None:
    """Make sure the database is migrated to the revision this code needs.

    Raises:
        StorageError: it is not, with the command that fixes it.
        SQLAlchemyError, OSError: the database cannot be reached (callers retry).
    """
    needed = head_revision()
    async with engine.connect() as conn:
        try:
            found = (await conn.execute(text("SELECT version_num FROM alembic_version"))).scalar()
        except ProgrammingError:
            found = None
        except OperationalError:
            if conn.dialect.name != "sqlite":  # SQLite's "no such table"; elsewhere, an outage
                raise
            found = None
    if found != needed:
        raise StorageError(
            f"the database schema is at revision {found or 'none'}, this code needs {needed}: "
            "run `stepline db upgrade`"
        )
