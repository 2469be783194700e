"""Isolation on the real services: a vhost per run, a database per test cloned from a template."""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import uuid
from pathlib import Path
from urllib.parse import quote

import psycopg

from stepline.shared.db import stores

ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
AMQP_ROOT = "amqp://guest:guest@127.0.0.1:5672"

# A wedged broker node makes rabbitmqctl hang for ever: fail the run instead.
RABBITMQCTL_TIMEOUT_S = 120

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
    subprocess.run(
        ["rabbitmqctl", "-q", "-t", str(RABBITMQCTL_TIMEOUT_S - 10), "add_vhost", name],
        check=True,
        capture_output=True,
        timeout=RABBITMQCTL_TIMEOUT_S,
    )
    subprocess.run(
        ["rabbitmqctl", "-q", "set_permissions", "-p", name, "guest", ".*", ".*", ".*"],
        check=True,
        capture_output=True,
        timeout=RABBITMQCTL_TIMEOUT_S,
    )


def delete_vhost(name: str) -> None:
    """Delete a vhost and every queue in it."""
    subprocess.run(
        ["rabbitmqctl", "-q", "-t", str(RABBITMQCTL_TIMEOUT_S - 10), "delete_vhost", name],
        check=False,
        capture_output=True,
        timeout=RABBITMQCTL_TIMEOUT_S,
    )
