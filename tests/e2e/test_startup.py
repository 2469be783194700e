"""A worker or scheduler that cannot reach a service at start-up says why in one line and exits 3."""

from __future__ import annotations

import json
import socket
import subprocess
import uuid
from collections.abc import Iterator

import psycopg
import pytest

from stepline.shared.settings import Settings
from tests.support import services
from tests.support.fleet import ProcessFleet
from tests.support.polling import eventually

pytestmark = pytest.mark.e2e

UNAVAILABLE = 3
"""The documented exit status of a service that did not answer at start-up (pinned, not imported)."""
PASSWORD = "pw-" + uuid.uuid4().hex
COMMANDS = {
    "stepline-worker": ("stepline-worker", "--workflows", "tests.workflows"),
    "stepline-scheduler": ("stepline-scheduler",),
}


@pytest.fixture
def role_without_connections(settings: Settings) -> Iterator[str]:
    """A database URL, with a password, for a role PostgreSQL gives no connection (CONNECTION LIMIT 0).

    The server's own max_connections is shared with everyone's tests, so the
    limit that runs out is this role's: the error is PostgreSQL's own, "too
    many connections for role".
    """
    role = f"sl_no_room_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(services.ADMIN_URL, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {role} LOGIN PASSWORD '{PASSWORD}' CONNECTION LIMIT 0")
    database = settings.database.rsplit("/", 1)[1]
    try:
        yield f"postgresql://{role}:{PASSWORD}@127.0.0.1:5432/{database}"
    finally:
        with psycopg.connect(services.ADMIN_URL, autocommit=True) as conn:
            conn.execute(f"DROP ROLE {role}")


@pytest.fixture
def closed_port() -> int:
    """A local port nothing listens on."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


async def _exit_of(process: subprocess.Popen[bytes]) -> int:
    async def code() -> int | None:
        return process.poll()

    result = await eventually(
        code, check=lambda value: value is not None, timeout=30, what="the process to exit"
    )
    assert result is not None
    return result


def _failure_line(output: str, command: str) -> str:
    """The one line that is not a log record: the failure (there is no traceback)."""
    assert "Traceback" not in output
    others = [line for line in output.splitlines() if line.strip() and not line.startswith("{")]
    for line in output.splitlines():
        if line.startswith("{"):
            json.loads(line)  # a log record, whole on its line
    assert len(others) == 1, output
    assert others[0].startswith(f"{command}: "), output
    return others[0]


async def _run_until_exit(fleet: ProcessFleet, command: str, **env: str) -> tuple[int, str]:
    fleet.env.update(STEPLINE_LOG_FORMAT="json", STEPLINE_STARTUP_TIMEOUT="1s", **env)
    process = fleet.start(command, *COMMANDS[command])
    code = await _exit_of(process)
    return code, fleet.log(command)


@pytest.mark.parametrize("command", sorted(COMMANDS))
async def test_a_database_with_no_connection_left_is_named_with_what_to_do(
    command: str, process_fleet: ProcessFleet, role_without_connections: str
) -> None:
    code, output = await _run_until_exit(
        process_fleet, command, STEPLINE_DATABASE_URL=role_without_connections
    )

    assert code == UNAVAILABLE
    line = _failure_line(output, command)
    role = role_without_connections.split("//", 1)[1].split(":", 1)[0]
    assert f"PostgreSQL at postgresql://{role}:***@127.0.0.1:5432/" in line
    assert f'too many connections for role "{role}"' in line
    assert "STEPLINE_DATABASE__MAX_CONNECTIONS" in line and "max_connections" in line
    assert "STEPLINE_STARTUP_TIMEOUT" in line
    assert PASSWORD not in output


@pytest.mark.parametrize("command", sorted(COMMANDS))
async def test_an_unreachable_broker_is_named_with_what_to_do(
    command: str, process_fleet: ProcessFleet, closed_port: int
) -> None:
    url = f"amqp://guest:{PASSWORD}@127.0.0.1:{closed_port}/stepline"
    code, output = await _run_until_exit(process_fleet, command, STEPLINE_AMQP_URL=url)

    assert code == UNAVAILABLE
    line = _failure_line(output, command)
    assert f"RabbitMQ at amqp://guest:***@127.0.0.1:{closed_port}/stepline" in line
    assert "Connect call failed" in line
    assert "check STEPLINE_AMQP_URL" in line
    assert PASSWORD not in output
