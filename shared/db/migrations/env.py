"""Alembic environment: runs migrations on the URL that stepline.shared.db.migrate passes in."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine, pool

from stepline.shared.db.schema import metadata

config = context.config
url = config.attributes["sqlalchemy_url"]
engine = create_engine(url, poolclass=pool.NullPool)
try:
    with engine.connect() as connection:
        context.configure(connection=connection, target_metadata=metadata)
        with context.begin_transaction():
            # Two processes migrating at once take turns instead of failing half-way.
            connection.exec_driver_sql("SELECT pg_advisory_xact_lock(7405421653)")
            context.run_migrations()
finally:
    engine.dispose()
