"""Apply the Alembic migrations that live beside the schema."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, text
from sqlalchemy.exc import ProgrammingError
from sqlalchemy.ext.asyncio import AsyncEngine

from shared.db.engine import driver_url
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
    command.upgrade(alembic_config(database_url), revision)


def current_revision(database_url: str) -> str | None:
    """The revision the database is at, or None if it was never migrated."""
    engine = create_engine(driver_url(database_url))
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
    if found != needed:
        raise StorageError(
            f"the database schema is at revision {found or 'none'}, this code needs {needed}: "
            "run `stepline db upgrade`"
        )
