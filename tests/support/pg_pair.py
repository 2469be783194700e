"""A PostgreSQL primary with a synchronous standby, and PgBouncer, of the tests' own (scripts/*.sh).

The pair runs on ports 5441/5442 and PgBouncer on 6441 unless the environment
says otherwise (``STEPLINE_PG_PRIMARY_PORT`` ... as the scripts read it); the
shared server on 5432 is never touched. Each helper calls the script that an
operator would, so the tests run what the docs tell people to run.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg

from stepline.shared.db import stores
from tests.support.services import SIDE_EFFECTS_DDL

ROOT = Path(__file__).resolve().parents[2]
STANDBY_SCRIPT = ROOT / "scripts" / "postgres-standby.sh"
PGBOUNCER_SCRIPT = ROOT / "scripts" / "pgbouncer.sh"
PRIMARY_PORT = int(os.environ.get("STEPLINE_PG_PRIMARY_PORT", "5441"))
STANDBY_PORT = int(os.environ.get("STEPLINE_PG_STANDBY_PORT", "5442"))
PGBOUNCER_PORT = int(os.environ.get("STEPLINE_PGBOUNCER_PORT", "6441"))
HOST = "127.0.0.1"
LOCKS = Path(tempfile.gettempdir())


def _script(script: Path, *args: str, env: dict[str, str] | None = None, timeout_s: float = 180) -> str:
    done = subprocess.run(
        ["bash", str(script), *args],
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{script.name} {' '.join(args)} failed: {done.stdout}{done.stderr}")
    return done.stdout


def pair_up() -> None:
    """A fresh pair: whatever an earlier run left (a failed-over pair) is dropped first."""
    _script(STANDBY_SCRIPT, "down")
    _script(STANDBY_SCRIPT, "up")


def pair_down() -> None:
    """Stop and drop both clusters (by pg_ctlcluster, through the script)."""
    _script(STANDBY_SCRIPT, "down")


def failover() -> float:
    """Stop the primary with ``-m immediate`` and promote the standby; returns the seconds it took."""
    began = time.monotonic()
    _script(STANDBY_SCRIPT, "failover")
    return time.monotonic() - began


def pair_url(database: str) -> str:
    """The URL naming the primary and its standby, as a deployment would write it."""
    return (
        f"postgresql://postgres@{HOST}:{PRIMARY_PORT},{HOST}:{STANDBY_PORT}/{database}"
        "?target_session_attrs=read-write"
    )


def direct_url(database: str, port: int = PRIMARY_PORT) -> str:
    """The URL of one server of the pair (or PgBouncer's port)."""
    return f"postgresql://postgres@{HOST}:{port}/{database}"


def create_database(admin_url: str, name: str, url: str) -> None:
    """A migrated database ``name`` (with the tests' side-effect table), reached at ``url``."""
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    stores.upgrade(url)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(SIDE_EFFECTS_DDL)


def pgbouncer_up(folder: Path, upstream_port: int, *, pool_size: int) -> None:
    """PgBouncer in transaction pooling mode in front of ``upstream_port``, its files in ``folder``."""
    _script(
        PGBOUNCER_SCRIPT,
        "up",
        env={
            "STEPLINE_PGBOUNCER_DIR": str(folder),
            "STEPLINE_PGBOUNCER_UPSTREAM": f"{HOST}:{upstream_port}",
            "STEPLINE_PGBOUNCER_POOL_SIZE": str(pool_size),
        },
    )


def pgbouncer_down(folder: Path) -> None:
    """Stop PgBouncer by the pid in its folder."""
    _script(PGBOUNCER_SCRIPT, "down", env={"STEPLINE_PGBOUNCER_DIR": str(folder)})


def connections_of(admin_url: str, application_prefix: str) -> int:
    """How many server connections carry an application_name starting with ``application_prefix``."""
    with psycopg.connect(admin_url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE %s",
            (application_prefix + "%",),
        ).fetchone()
    return int(row[0]) if row else 0


@contextlib.contextmanager
def exclusive(what: str = "pair", timeout_s: float = 900) -> Iterator[None]:
    """Hold the pair (or ``"pgbouncer"``) for this test alone: tests in other xdist processes wait.

    Their ports are fixed, so two tests must not run either at once.
    """
    port = PRIMARY_PORT if what == "pair" else PGBOUNCER_PORT
    lock = LOCKS / f"stepline-{what}-{port}.lock"
    with lock.open("w") as handle:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the {what} stayed busy for {timeout_s:.0f}s") from None
                time.sleep(0.5)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
