"""Apply the Alembic migrations that live beside the schema."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine

from stepline.shared.db.engine import driver_url, sqlite_path
from stepline.shared.db.revisions import head_revision
from stepline.shared.db.schema import metadata
from stepline.shared.errors import StorageError

MIGRATIONS = Path(__file__).with_name("migrations")


def alembic_config(database_url: str) -> Config:
    """An Alembic config pointing at our migrations and the given database."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["sqlalchemy_url"] = driver_url(database_url)
    return config


def upgrade_postgres(database_url: str, revision: str = "head") -> None:
    """Bring a PostgreSQL database to ``revision`` (default: the newest); safe to repeat.

    ``stepline.shared.db.stores.upgrade`` picks this or ``create_embedded`` by URL.
    """
    command.upgrade(alembic_config(database_url), revision)


def create_embedded(database_url: str) -> None:
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
