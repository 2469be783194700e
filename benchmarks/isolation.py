"""A database and a vhost of the benchmark's own, created at the start and dropped at the end."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from urllib.parse import quote, urlsplit, urlunsplit

import aio_pika
import psycopg
from aio_pika.exceptions import ChannelClosed
from sqlalchemy.engine import make_url

from stepline.shared.db import stores
from stepline.shared.settings import Settings
from stepline.shared.topology import start_queue_name, workflow_queue_name

# A wedged broker node makes rabbitmqctl hang for ever: fail the run instead.
RABBITMQCTL_TIMEOUT_S = 120

DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/stepline"
DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/stepline"


@dataclass(frozen=True)
class Isolation:
    """Where this run works: a fresh database and vhost on the configured servers."""

    admin_url: str
    database: str
    database_url: str
    vhost: str
    amqp_url: str

    @classmethod
    def new(cls, database_url: str | None = None, amqp_url: str | None = None) -> Isolation:
        """Names for this run on the servers that ``STEPLINE_DATABASE_URL``/``STEPLINE_AMQP_URL`` name."""
        base_db = database_url or os.environ.get("STEPLINE_DATABASE_URL") or DEFAULT_DATABASE_URL
        base_amqp = amqp_url or os.environ.get("STEPLINE_AMQP_URL") or DEFAULT_AMQP_URL
        run = uuid.uuid4().hex[:8]
        database, vhost = f"stepline_bench_{run}", f"stepline-bench-{run}"
        url = make_url(base_db).set(drivername="postgresql")
        parts = urlsplit(base_amqp)
        return cls(
            admin_url=url.set(database="postgres").render_as_string(hide_password=False),
            database=database,
            database_url=url.set(database=database).render_as_string(hide_password=False),
            vhost=vhost,
            amqp_url=urlunsplit(parts._replace(path="/" + quote(vhost, safe=""))),
        )

    def create(self) -> None:
        """Create and migrate the database, and create the vhost."""
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{self.database}"')
        stores.upgrade(self.database_url)
        _create_vhost(self.amqp_url, self.vhost)

    def drop(self) -> None:
        """Drop the database (closing what is still connected) and delete the vhost; never raises."""
        try:
            with psycopg.connect(self.admin_url, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{self.database}" WITH (FORCE)')
        except psycopg.Error as exc:
            print(f"benchmarks: could not drop database {self.database}: {exc}")
        try:
            _delete_vhost(self.amqp_url, self.vhost)
        except (OSError, subprocess.SubprocessError, urllib.error.URLError) as exc:
            print(f"benchmarks: could not delete vhost {self.vhost}: {exc}")


async def purge_queues(amqp_url: str, workflows: list[str]) -> int:
    """Empty the workflows' queues and start queues (those that exist); how many messages they held."""
    namespace = Settings.model_fields["namespace"].default
    purged = 0
    connection = await aio_pika.connect(amqp_url)
    try:
        for workflow in workflows:
            for name in (workflow_queue_name(namespace, workflow), start_queue_name(namespace, workflow)):
                channel = await connection.channel()
                try:
                    queue = await channel.declare_queue(name, passive=True)
                except ChannelClosed:  # no worker declared it yet
                    continue
                purged += queue.declaration_result.message_count or 0
                await queue.purge()
                await channel.close()
    finally:
        await connection.close()
    return purged


def _local(amqp_url: str) -> bool:
    host = urlsplit(amqp_url).hostname or "localhost"
    return host in ("localhost", "127.0.0.1", "::1") and shutil.which("rabbitmqctl") is not None


def _create_vhost(amqp_url: str, vhost: str) -> None:
    user = urlsplit(amqp_url).username or "guest"
    if _local(amqp_url):
        subprocess.run(
            ["rabbitmqctl", "-q", "-t", str(RABBITMQCTL_TIMEOUT_S - 10), "add_vhost", vhost],
            check=True,
            capture_output=True,
            timeout=RABBITMQCTL_TIMEOUT_S,
        )
        subprocess.run(
            ["rabbitmqctl", "-q", "set_permissions", "-p", vhost, user, ".*", ".*", ".*"],
            check=True,
            capture_output=True,
            timeout=RABBITMQCTL_TIMEOUT_S,
        )
        return
    _management(amqp_url, "PUT", f"/api/vhosts/{quote(vhost, safe='')}", {})
    _management(
        amqp_url,
        "PUT",
        f"/api/permissions/{quote(vhost, safe='')}/{quote(user, safe='')}",
        {"configure": ".*", "write": ".*", "read": ".*"},
    )


def _delete_vhost(amqp_url: str, vhost: str) -> None:
    if _local(amqp_url):
        subprocess.run(
            ["rabbitmqctl", "-q", "-t", str(RABBITMQCTL_TIMEOUT_S - 10), "delete_vhost", vhost],
            check=False,
            capture_output=True,
            timeout=RABBITMQCTL_TIMEOUT_S,
        )
        return
    _management(amqp_url, "DELETE", f"/api/vhosts/{quote(vhost, safe='')}", None)


def _management(amqp_url: str, method: str, path: str, body: dict[str, str] | None) -> None:
    """Call the RabbitMQ management API (port 15672) when rabbitmqctl is not at hand."""
    parts = urlsplit(amqp_url)
    token = base64.b64encode(f"{parts.username or 'guest'}:{parts.password or 'guest'}".encode()).decode()
    request = urllib.request.Request(
        f"http://{parts.hostname}:15672{path}",
        method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": f"Basic {token}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10):
        pass
