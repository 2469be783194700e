"""Wait for PostgreSQL and RabbitMQ at start-up; give up with one line that says what to do."""

from __future__ import annotations

import asyncio

from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from stepline.shared.broker import Broker
from stepline.shared.db.engine import MAX_CONNECTIONS_SETTING, is_too_many_clients
from stepline.shared.db.store import Store
from stepline.shared.errors import BrokerError, ServiceUnavailableError
from stepline.shared.redaction import scrub_password
from stepline.shared.retrying import retry_until
from stepline.shared.tls import is_tls_refusal, tls_hint

TOO_MANY_CONNECTIONS_HINT = (
    "the server has no connection left for this process: each process opens at most "
    f"{MAX_CONNECTIONS_SETTING} connections (default: a stepline-worker STEPLINE_WORKER__CONCURRENCY "
    "+ 2, a stepline-scheduler 6, a client 8), so lower it or run fewer processes, raise "
    "PostgreSQL's max_connections (or the CONNECTION LIMIT of the role or database), or put "
    "PgBouncer in front (docs/topology.md gives the sizing arithmetic)"
)


async def connect_broker(broker: Broker, url: str, *, deadline_s: float, stopping: asyncio.Event) -> None:
    """Connect to the broker, retrying until ``deadline_s``.

    Raises:
        ServiceUnavailableError: it did not answer in time (one line: cause and remedy).
        StopRequested: ``stopping`` was set first.
    """
    service = _broker_name(url)

    def broker_cause(exc: BaseException) -> str:
        return driver_cause(exc.__cause__ or exc)

    try:
        await retry_until(
            broker.connect,
            what=service,
            deadline_s=deadline_s,
            retry_on=(BrokerError,),
            stopping=stopping,
            is_final=lambda exc: is_tls_refusal(broker_cause(exc)),
        )
    except BrokerError as exc:
        cause = broker_cause(exc)
        raise ServiceUnavailableError(
            service, url, scrub_password(cause, url), broker_hint(cause, url=url), _waited(cause, deadline_s)
        ) from exc


async def check_database(store: Store, url: str, *, deadline_s: float, stopping: asyncio.Event) -> None:
    """Make sure the database answers and is migrated, retrying until ``deadline_s``.

    Raises:
        ServiceUnavailableError: it did not answer in time (one line: cause and remedy).
        StorageError: it answers but is not migrated (the text names the command).
        StopRequested: ``stopping`` was set first.
    """
    service = store.service

    def database_cause(exc: BaseException) -> str:
        return driver_cause(exc.orig if isinstance(exc, DBAPIError) and exc.orig else exc)

    try:
        await retry_until(
            store.check_schema,
            what=service,
            deadline_s=deadline_s,
            retry_on=(SQLAlchemyError, OSError),
            stopping=stopping,
            is_final=lambda exc: is_tls_refusal(database_cause(exc)),
        )
    except (SQLAlchemyError, OSError) as exc:
        cause = database_cause(exc)
        raise ServiceUnavailableError(
            service,
            url,
            scrub_password(cause, url),
            database_hint(cause, url=url),
            _waited(cause, deadline_s),
        ) from exc


def driver_cause(exc: BaseException) -> str:
    """The driver's error as one line (PostgreSQL's span several; the type stands in for no text)."""
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def database_hint(cause: str, *, url: str = "") -> str:
    """What to do about a database that refused or did not answer, going by the driver's words."""
    tls = tls_hint(cause, url_setting="STEPLINE_DATABASE_URL", sends_certificate="sslcert=" in url)
    if tls is not None:
        return tls
    lowered = cause.lower()
    if is_too_many_clients(Exception(cause)):
        return TOO_MANY_CONNECTIONS_HINT
    if "password authentication failed" in lowered or "no pg_hba.conf entry" in lowered:
        return "check the user and password in STEPLINE_DATABASE_URL and the server's pg_hba.conf"
    if "does not exist" in lowered and "database" in lowered:
        return (
            "create the database and run `stepline db upgrade`, "
            "or fix the database name in STEPLINE_DATABASE_URL"
        )
    return "check STEPLINE_DATABASE_URL, and that PostgreSQL runs and accepts connections from this host"


def broker_hint(cause: str, *, url: str = "") -> str:
    """What to do about a broker that refused or did not answer, going by the driver's words."""
    if url.startswith("amqps://"):
        tls = tls_hint(cause, url_setting="STEPLINE_AMQP_URL", sends_certificate="certfile=" in url)
        if tls is not None:
            return tls
    if "ACCESS_REFUSED" in cause:
        return "check the user and password in STEPLINE_AMQP_URL, and the user's permissions on the vhost"
    return (
        "check STEPLINE_AMQP_URL (host, port, vhost), and that RabbitMQ runs "
        "and accepts connections from this host"
    )


def _waited(cause: str, deadline_s: float) -> float | None:
    """How long the start-up waited before giving up: None for a TLS refusal, which is not waited out."""
    return None if is_tls_refusal(cause) else deadline_s


def _broker_name(url: str) -> str:
    return "the embedded queue" if url.startswith("sqlite:") else "RabbitMQ"


__all__ = ["broker_hint", "check_database", "connect_broker", "database_hint", "driver_cause"]
