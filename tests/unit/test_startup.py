"""The one line a process prints when a service did not answer at start-up: its cause, and a hint."""

from __future__ import annotations

from stepline.shared.startup import broker_hint, database_hint, driver_cause


def test_the_hint_for_a_full_server_names_the_pools_and_the_limit() -> None:
    for cause in (
        "FATAL:  sorry, too many clients already",
        'FATAL:  too many connections for role "app"',
        'FATAL:  too many connections for database "app"',
        "FATAL:  remaining connection slots are reserved for roles with the SUPERUSER attribute",
    ):
        hint = database_hint(cause)
        assert "STEPLINE_DATABASE__MAX_CONNECTIONS" in hint and "max_connections" in hint, cause


def test_other_start_up_failures_get_their_own_hints() -> None:
    assert "password" in database_hint('FATAL:  password authentication failed for user "app"')
    assert "stepline db upgrade" in database_hint('FATAL:  database "app" does not exist')
    assert "PostgreSQL runs" in database_hint("[Errno 111] Connection refused")
    assert "password" in broker_hint(
        "ACCESS_REFUSED - Login was refused using authentication mechanism PLAIN."
    )
    assert "RabbitMQ runs" in broker_hint("[Errno 111] Connect call failed ('127.0.0.1', 5672)")


def test_a_driver_cause_is_one_line() -> None:
    cause = driver_cause(OSError("connection failed\n\tIs the server running on that host?"))
    assert cause == "connection failed Is the server running on that host?"
    assert driver_cause(TimeoutError()) == "TimeoutError"
