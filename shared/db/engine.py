"""Build SQLAlchemy engines from the plain postgresql:// URL users configure."""

from __future__ import annotations

from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine


def driver_url(database_url: str) -> URL:
    """``postgresql://...`` with the psycopg 3 driver made explicit."""
    url = make_url(database_url)
    if url.drivername in ("postgresql", "postgres"):
        url = url.set(drivername="postgresql+psycopg")
    return url


def mask_url(database_url: str) -> str:
    """The URL with its password hidden, for logs and errors."""
    return make_url(database_url).render_as_string(hide_password=True)


def create_engine(database_url: str, *, pool_size: int = 10) -> AsyncEngine:
    """An async engine over psycopg 3 whose pooled connections survive a database restart."""
    return create_async_engine(
        driver_url(database_url),
        pool_size=pool_size,
        max_overflow=pool_size,
        # A connection killed by a database restart is found and replaced on checkout.
        pool_pre_ping=True,
    )
