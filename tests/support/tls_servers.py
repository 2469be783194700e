"""The TLS-only PostgreSQL cluster and RabbitMQ node of scripts/tls-servers.sh, shared by test processes.

Each pytest process (xdist worker) that uses them holds a shared lock for as
long as it does; the last one to let go stops both servers by their pids, so
nothing outlives the run, whichever test failed.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psycopg
from psycopg import sql

from tests.support.fleet import ROOT

SCRIPT = ROOT / "scripts" / "tls-servers.sh"
DIR = Path(os.environ.get("STEPLINE_TLS_DIR", "/tmp/stepline-tls"))
CERTS = DIR / "certs"
PG_PORT = 5451
AMQPS_PORT = 5691
# The socket trusts; TCP takes TLS with a client certificate only (see the script).
ADMIN_CONNINFO = f"host=/var/run/postgresql port={PG_PORT} user=postgres dbname=postgres"
SCRIPT_TIMEOUT_S = 240


@dataclass(frozen=True)
class TlsServers:
    """Where the servers listen (by the name their certificate carries) and the files to reach them."""

    ca_file: Path = CERTS / "ca.pem"
    other_ca_file: Path = CERTS / "other-ca.pem"
    cert_file: Path = CERTS / "client.pem"
    key_file: Path = CERTS / "client-key.pem"
    amqp_url: str = f"amqps://guest:guest@localhost:{AMQPS_PORT}/"

    def database_url(self, name: str) -> str:
        """A plain URL of a database on the TLS cluster: the TLS options come from settings or are added."""
        return f"postgresql://postgres@localhost:{PG_PORT}/{name}"

    def libpq_url(self, name: str) -> str:
        """The database's URL with every TLS option in libpq's own parameters, needing no settings."""
        return (
            f"{self.database_url(name)}?sslmode=verify-full&sslrootcert={self.ca_file}"
            f"&sslcert={self.cert_file}&sslkey={self.key_file}"
        )

    def tls_env(self, *, ca_file: Path | None = None, client_certificate: bool = True) -> dict[str, str]:
        """``STEPLINE_TLS__*`` for these servers (another CA, or no client certificate, if asked)."""
        env = {"STEPLINE_TLS__CA_FILE": str(ca_file or self.ca_file)}
        if client_certificate:
            env.update(STEPLINE_TLS__CERT_FILE=str(self.cert_file), STEPLINE_TLS__KEY_FILE=str(self.key_file))
        return env


def _script(command: str) -> None:
    result = subprocess.run(
        ["bash", str(SCRIPT), command],
        capture_output=True,
        text=True,
        timeout=SCRIPT_TIMEOUT_S,
        check=False,
    )
    assert result.returncode == 0, f"tls-servers.sh {command} failed:\n{result.stdout}{result.stderr}"


@contextmanager
def running_tls_servers() -> Iterator[TlsServers]:
    """Bring the servers up (idempotently) and stop them once no test process uses them any more."""
    DIR.mkdir(parents=True, exist_ok=True)
    with (DIR / "users.lock").open("w") as users, (DIR / "up.lock").open("w") as starting:
        # Shared first: a process that is stopping the servers holds it exclusively until they stopped.
        fcntl.flock(users, fcntl.LOCK_SH)
        fcntl.flock(starting, fcntl.LOCK_EX)
        try:
            _script("up")
        finally:
            fcntl.flock(starting, fcntl.LOCK_UN)
        try:
            yield TlsServers()
        finally:
            fcntl.flock(users, fcntl.LOCK_UN)
            try:
                fcntl.flock(users, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pass  # another test process still uses them: the last one stops them
            else:
                _script("down")


@contextmanager
def tls_database() -> Iterator[str]:
    """A new empty database on the TLS cluster (made through the local socket), dropped after."""
    name = f"tls_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(ADMIN_CONNINFO, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield name
    finally:
        with psycopg.connect(ADMIN_CONNINFO, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
