"""What a Stepline PostgreSQL connection is, as the engine and the plain read both make it.

``engine`` builds connections through SQLAlchemy; ``plain_read`` (``stepline status``)
through psycopg alone, so as not to import SQLAlchemy. Both take these from here.
"""

from __future__ import annotations

LIBPQ_SCHEMES = ("postgresql", "postgres")
"""The URL schemes libpq takes, which the engine turns into ``postgresql+psycopg``."""
PGBOUNCER_FLAG = "pgbouncer"
"""``?pgbouncer=true`` in a database URL: no server-side prepared statements (transaction pooling)."""
APPLICATION_NAME_CHARS = 63
"""PostgreSQL keeps the first 63 bytes of ``application_name``."""


def application_name_of(name: str) -> str:
    """``name`` as PostgreSQL keeps it, unless the URL names the connection itself."""
    return name[:APPLICATION_NAME_CHARS]


__all__ = ["APPLICATION_NAME_CHARS", "LIBPQ_SCHEMES", "PGBOUNCER_FLAG", "application_name_of"]
