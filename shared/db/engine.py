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


def create_engine(database_url: str, *, pool_size: int = 10, pre_ping: bool = True) -> AsyncEngine:
    """An async engine over psycopg 3 whose pooled connections survive a database restart.

    ``pre_ping`` tests each connection on checkout (a ``SELECT 1`` round trip).
    Workers and schedulers turn it off on their hot path: they already treat a
    failed statement as an outage and retry, and SQLAlchemy invalidates the
    pool's connections when one turns out to be dead.
    """
    return create_async_engine(
        driver_url(database_url),
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_pre_ping=pre_ping,
    )
