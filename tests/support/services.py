"""Isolation on the real services: vhosts of the run's own, a database per test cloned from a template."""

from __future__ import annotations

import contextlib
import json
import shutil
import sqlite3
import subprocess
import uuid
from pathlib import Path
from typing import Literal
from urllib.parse import quote

import psycopg

from stepline.shared.db import stores

ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
AMQP_ROOT = "amqp://guest:guest@127.0.0.1:5672"

# A wedged broker node makes rabbitmqctl hang for ever: fail the run instead.
RABBITMQCTL_TIMEOUT_S = 120

SINGLE_NODE_QUEUE_TYPE: Literal["classic"] = "classic"
"""The suite's queue type on the shared RabbitMQ node: the single dev node of docs/operations.md.

Quorum is the default, but the suite makes some thirty queues per test and a vhost per 60 tests,
and RabbitMQ 3.10 wedged twice deleting vhosts that held thousands of quorum queues. So the
harness sets classic explicitly; the tests of quorum queues use a small vhost of their own
(``quorum_vhost`` in tests/conftest.py), emptied queue by queue.
"""
QUORUM_VHOST_MAX_QUEUES = 12
"""Most queues a test's quorum vhost may hold: each quorum queue is a Raft group on the shared node."""

SIDE_EFFECTS_DDL = """
CREATE TABLE side_effects (
    id bigserial PRIMARY KEY,
    instance_id text NOT NULL,
    step text NOT NULL,
    attempt int NOT NULL,
    worker_pid int NOT NULL,
    note text NOT NULL DEFAULT '',
    at timestamptz NOT NULL DEFAULT clock_timestamp()
)
"""


SQLITE_SIDE_EFFECTS_DDL = """
CREATE TABLE side_effects (
    id INTEGER PRIMARY KEY,
    instance_id TEXT NOT NULL,
    step TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    worker_pid INTEGER NOT NULL,
    note TEXT NOT NULL DEFAULT '',
    at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%d %H:%M:%f', 'now'))
)
"""


def create_embedded_state(database_url: str, path: Path) -> None:
    """The embedded mode's state for one test: its tables, and the side-effect log."""
    stores.upgrade(database_url)
    with sqlite3.connect(path) as conn:
        conn.execute(SQLITE_SIDE_EFFECTS_DDL)


def copy_embedded_state(template: Path, folder: Path) -> None:
    """The embedded mode's state for one test, copied from a template ``create_embedded_state`` made.

    A copy of the closed SQLite file is what migrating it again would give, without the
    migrations' cost (about half a second per test on two busy cores).
    """
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(template, folder / template.name)


def database_url(name: str) -> str:
    """The URL of a database on the local server."""
    return f"postgresql://postgres@127.0.0.1:5432/{name}"


def amqp_url(vhost: str) -> str:
    """The URL of a vhost on the local broker."""
    return f"{AMQP_ROOT}/{quote(vhost, safe='')}"


def _admin(sql: str) -> None:
    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        conn.execute(sql)


def create_template(name: str) -> None:
    """A migrated database (plus the tests' side-effect table) to clone per test."""
    _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    _admin(f'CREATE DATABASE "{name}"')
    stores.upgrade(database_url(name))
    with psycopg.connect(database_url(name), autocommit=True) as conn:
        conn.execute(SIDE_EFFECTS_DDL)


def clone_database(template: str) -> str:
    """A fresh database cloned from ``template``; returns its name."""
    name = f"{template}_{uuid.uuid4().hex[:8]}"
    _admin(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
    return name


def drop_database(name: str) -> None:
    """Drop a database, closing any connection still open to it."""
    _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def create_vhost(name: str) -> None:
    """A RabbitMQ vhost that guest may use fully."""
    _rabbitmqctl("add_vhost", name)
    _rabbitmqctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")


def _rabbitmqctl(*args: str, check: bool = True) -> str:
    """``rabbitmqctl -q ARGS`` on the shared node, bounded in time; returns what it printed."""
    done = subprocess.run(
        ["rabbitmqctl", "-q", "-t", str(RABBITMQCTL_TIMEOUT_S - 10), *args],
        check=check,
        capture_output=True,
        text=True,
        timeout=RABBITMQCTL_TIMEOUT_S,
    )
    return done.stdout


def queue_types(vhost: str) -> dict[str, str]:
    """Each queue of ``vhost`` and its type (``classic`` or ``quorum``), as RabbitMQ lists them."""
    listed = json.loads(_rabbitmqctl("list_queues", "-p", vhost, "name", "type", "--formatter", "json"))
    return {row["name"]: row["type"] for row in listed}


def delete_quorum_queues(vhost: str) -> int:
    """Delete the quorum queues of ``vhost`` one by one; returns how many there were.

    Deleting a vhost that holds many quorum queues is what wedged RabbitMQ 3.10:
    one queue at a time keeps each deletion a small step the node finishes.
    """
    quorum = [name for name, kind in queue_types(vhost).items() if kind == "quorum"]
    for name in quorum:
        _rabbitmqctl("delete_queue", "-p", vhost, name, check=False)
    return len(quorum)


def remove_vhost(name: str) -> None:
    """Delete a vhost and what it holds at once: one with no quorum queue left (see ``delete_vhost``)."""
    _rabbitmqctl("delete_vhost", name, check=False)


def delete_vhost(name: str) -> None:
    """Delete a vhost and every queue in it (its quorum queues first, one by one)."""
    with contextlib.suppress(subprocess.SubprocessError, ValueError):
        delete_quorum_queues(name)
    remove_vhost(name)
