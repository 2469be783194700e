"""Database URLs naming a primary and its standbys, PgBouncer, and the connection budget setting."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects.postgresql.psycopg import PGDialect_psycopg

from stepline.shared.db.engine import (
    driver_url,
    is_read_only,
    is_too_many_clients,
    is_unreachable,
    uses_pgbouncer,
)
from stepline.shared.errors import ConfigError
from stepline.shared.settings import load_settings


def _libpq_params(url: str) -> dict[str, Any]:
    """What SQLAlchemy's psycopg dialect hands to libpq for ``url``."""
    dialect = PGDialect_psycopg()  # type: ignore[no-untyped-call]
    _, params = dialect.create_connect_args(driver_url(url))  # type: ignore[no-untyped-call]
    return dict(params)


HOST_LIST = "postgresql://app:s3cret@h1:5441,h2:5442/orders?target_session_attrs=read-write"


def test_a_host_list_reaches_libpq_as_hosts_and_ports() -> None:
    params = _libpq_params(HOST_LIST)
    assert params["host"] == "h1,h2"
    assert params["port"] == "5441,5442"
    assert params["dbname"] == "orders"
    assert params["target_session_attrs"] == "read-write"
    assert params["password"] == "s3cret"


def test_sqlalchemy_s_own_multi_host_form_is_accepted_too() -> None:
    url = "postgresql://app@/orders?host=h1:5441&host=h2:5442&target_session_attrs=read-write"
    params = _libpq_params(url)
    assert (params["host"], params["port"]) == ("h1,h2", "5441,5442")


def test_pgbouncer_flag_is_read_and_kept_from_libpq() -> None:
    url = "postgresql://app@bouncer:6432/orders?pgbouncer=true"
    assert uses_pgbouncer(url)
    assert not uses_pgbouncer(HOST_LIST)
    assert "pgbouncer" not in driver_url(url).query


def test_the_connection_budget_is_a_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STEPLINE_DATABASE_URL", HOST_LIST)
    monkeypatch.setenv("STEPLINE_AMQP_URL", "amqp://guest:guest@localhost/")
    monkeypatch.setenv("STEPLINE_DATABASE__MAX_CONNECTIONS", "12")
    monkeypatch.setenv("STEPLINE_DATABASE__PGBOUNCER", "true")
    settings = load_settings()
    assert settings.db.max_connections == 12 and settings.db.pgbouncer
    assert settings.db.budget(99) == 12
    assert settings.database == HOST_LIST
    monkeypatch.setenv("STEPLINE_DATABASE__MAX_CONNECTIONS", "1")
    with pytest.raises(ConfigError, match="STEPLINE_DATABASE__MAX_CONNECTIONS is invalid"):
        load_settings()


def test_a_full_server_is_recognised_in_postgres_and_pgbouncer_words() -> None:
    assert is_too_many_clients(Exception("FATAL:  sorry, too many clients already"))
    assert is_too_many_clients(Exception('FATAL:  too many connections for database "x"'))
    assert is_too_many_clients(Exception("ERROR:  no more connections allowed (max_client_conn)"))
    assert not is_too_many_clients(Exception("connection refused"))


def test_a_standby_refusing_a_write_is_recognised_by_its_sqlstate() -> None:
    assert is_read_only(psycopg.errors.ReadOnlySqlTransaction("cannot execute UPDATE"))
    assert not is_read_only(psycopg.errors.UniqueViolation("duplicate key"))
    assert not is_read_only(Exception("read-only"))


def _wrapped(error: psycopg.Error, *, invalidated: bool = False) -> sa_exc.StatementError:
    """``error`` as SQLAlchemy raises it from a statement."""
    return sa_exc.DBAPIError.instance(
        "SELECT 1", {}, error, psycopg.Error, connection_invalidated=invalidated
    )


@pytest.mark.parametrize(
    "error",
    [
        _wrapped(psycopg.OperationalError("connection failed: Connection refused")),  # no SQLSTATE
        _wrapped(psycopg.errors.AdminShutdown("terminating connection due to administrator command")),
        _wrapped(psycopg.errors.CannotConnectNow("the database system is starting up")),
        _wrapped(psycopg.errors.ReadOnlySqlTransaction("cannot execute UPDATE")),  # a failover
        _wrapped(psycopg.errors.UniqueViolation("duplicate key"), invalidated=True),
        sa_exc.TimeoutError("no database connection came free within 30s"),
        ConnectionRefusedError(111, "Connection refused"),
    ],
    ids=["refused", "admin-shutdown", "starting", "read-only", "invalidated", "pool-timeout", "oserror"],
)
def test_an_unreachable_database_is_told_from_the_statement(error: BaseException) -> None:
    assert is_unreachable(error)


@pytest.mark.parametrize(
    "error",
    [
        _wrapped(psycopg.errors.UniqueViolation("duplicate key")),
        _wrapped(psycopg.errors.DeadlockDetected("deadlock detected")),
        _wrapped(psycopg.errors.InvalidTextRepresentation("invalid input syntax")),
        ValueError("not a database error"),
    ],
    ids=["unique", "deadlock", "bad-data", "other"],
)
def test_an_error_of_the_statement_is_not_an_outage(error: BaseException) -> None:
    assert not is_unreachable(error)
