"""TLS for real: a cluster with ssl=on and a RabbitMQ TLS listener, both asking for client certificates.

The servers come from scripts/tls-servers.sh (a throwaway CA signs their
certificates and the client's); the CA and the client certificate reach
Stepline through ``STEPLINE_TLS__*`` or the URLs' own TLS options.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from stepline import Client, Producer
from stepline.shared.broker import create_broker
from stepline.shared.db import stores
from stepline.shared.errors import ServiceUnavailableError
from stepline.shared.settings import Settings
from stepline.shared.startup import check_database, connect_broker
from tests.support.fleet import ProcessFleet, process_env, until_consuming
from tests.support.services import SIDE_EFFECTS_DDL
from tests.support.tls_servers import TlsServers, running_tls_servers, tls_database

pytestmark = pytest.mark.e2e

STARTUP_TIMEOUT_S = 60.0
"""The default start-up wait of a worker (STEPLINE_STARTUP_TIMEOUT)."""


@pytest.fixture(scope="module")
def servers() -> Iterator[TlsServers]:
    """The TLS servers, stopped by pid after the last test process that used them."""
    with running_tls_servers() as running:
        yield running


@pytest.fixture
def tls_db(servers: TlsServers) -> Iterator[str]:
    """A database on the TLS cluster, migrated over verify-full TLS with the client certificate."""
    with tls_database() as name:
        url = servers.libpq_url(name)
        stores.upgrade(url)
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(SIDE_EFFECTS_DDL)
        yield name


def _settings(
    servers: TlsServers,
    database: str,
    *,
    ca_file: Path | None = None,
    client_certificate: bool = True,
    amqp_url: str | None = None,
) -> Settings:
    tls = {
        key.removeprefix("STEPLINE_TLS__").lower(): value
        for key, value in servers.tls_env(ca_file=ca_file, client_certificate=client_certificate).items()
    }
    return Settings(
        database_url=servers.database_url(database),
        amqp_url=amqp_url or servers.amqp_url,
        namespace=f"t{uuid.uuid4().hex[:10]}",
        tls=tls,
    )


async def _refusals(settings: Settings, *, deadline_s: float = 1) -> tuple[str, str]:
    """Why the broker and the database refuse these settings, as a starting worker would report it."""
    stopping = asyncio.Event()
    broker = create_broker(settings.amqp, settings.namespace, settings.broker)
    with pytest.raises(ServiceUnavailableError) as broker_refusal:
        await connect_broker(broker, settings.amqp, deadline_s=deadline_s, stopping=stopping)
    store = stores.create_store(settings.database, pool_size=1)
    try:
        with pytest.raises(ServiceUnavailableError) as database_refusal:
            await check_database(store, settings.database, deadline_s=deadline_s, stopping=stopping)
    finally:
        await store.close()
    return str(broker_refusal.value), str(database_refusal.value)


async def test_workflows_run_over_verify_full_and_amqps_with_the_ca_and_client_certificate_from_settings(
    servers: TlsServers, tls_db: str, tmp_path: Path
) -> None:
    settings = _settings(servers, tls_db)
    plain = Settings(database_url=servers.database_url(tls_db), amqp_url=servers.amqp_url)
    # The processes get the plain URLs and STEPLINE_TLS__*, as a deployment would configure them.
    env = {
        **process_env(settings),
        "STEPLINE_DATABASE_URL": plain.database,
        "STEPLINE_AMQP_URL": plain.amqp,
        **servers.tls_env(),
    }
    fleet = ProcessFleet(env, tmp_path)
    try:
        fleet.start("worker", "stepline-worker", "--workflows", "tests.workflows")
        fleet.start("scheduler", "stepline-scheduler")
        await until_consuming(settings, ["sequence", "sleeper"])
        async with (
            Producer.from_settings(settings) as producer,
            Client(
                settings.database, settings.amqp, namespace=settings.namespace, broker=settings.broker
            ) as client,
        ):
            adds = await producer.start("sequence", {"a": 2, "b": 3})
            naps = await producer.start("sleeper", {"duration": "300ms"})  # the scheduler fires its timer
            assert (await client.wait(adds, timeout=60)).status == "complete", fleet.log("worker")
            assert (await client.wait(naps, timeout=60)).status == "complete", fleet.log("scheduler")
        # Every connection to the database is TLS with the client certificate the settings named.
        with psycopg.connect(settings.database, autocommit=True) as conn:
            sessions = conn.execute(
                "SELECT s.ssl, s.client_dn, a.application_name FROM pg_stat_ssl s "
                "JOIN pg_stat_activity a USING (pid) WHERE a.datname = current_database()"
            ).fetchall()
        assert len(sessions) > 1, "the worker and scheduler keep connections open"
        assert {(ssl, dn) for ssl, dn, _ in sessions} == {(True, "/CN=postgres")}
    finally:
        fleet.stop_all()
    assert "Traceback" not in fleet.log("worker") + fleet.log("scheduler")


async def test_servers_whose_certificate_the_ca_did_not_sign_are_refused_naming_the_host(
    servers: TlsServers, tls_db: str
) -> None:
    # A worker's start-up wait (STEPLINE_STARTUP_TIMEOUT) is not spent on a refusal no retry changes.
    settings = _settings(servers, tls_db, ca_file=servers.other_ca_file)
    broker, database = await _refusals(settings, deadline_s=STARTUP_TIMEOUT_S)

    assert "RabbitMQ at amqps://guest:***@localhost:5691/" in broker
    assert f"PostgreSQL at postgresql://postgres@localhost:5451/{tls_db}?" in database
    for refusal in (broker, database):
        assert "(refused at once, not retried: waiting would not change it)" in refusal
        assert "certificate verify failed" in refusal.lower()
        assert "not signed by the CA in STEPLINE_TLS__CA_FILE" in refusal


async def test_servers_that_ask_for_a_client_certificate_refuse_a_client_without_one(
    servers: TlsServers, tls_db: str
) -> None:
    broker, database = await _refusals(_settings(servers, tls_db, client_certificate=False))

    assert "localhost:5691" in broker and "localhost:5451" in database
    assert "requires a valid client certificate" in database
    for refusal in (broker, database):
        assert "set STEPLINE_TLS__CERT_FILE and STEPLINE_TLS__KEY_FILE" in refusal


async def test_tls_options_in_a_url_win_over_the_settings_for_that_connection(
    servers: TlsServers, tls_db: str
) -> None:
    good = f"cafile={servers.ca_file}&certfile={servers.cert_file}&keyfile={servers.key_file}"
    settings = _settings(
        servers, tls_db, ca_file=servers.other_ca_file, amqp_url=f"{servers.amqp_url}?{good}"
    )
    # The broker URL names the right CA itself; the database falls back to the wrong one.
    broker = create_broker(settings.amqp, settings.namespace, settings.broker)
    await connect_broker(broker, settings.amqp, deadline_s=5, stopping=asyncio.Event())
    await broker.close()
    with pytest.raises(psycopg.OperationalError, match="certificate verify failed"):
        psycopg.connect(settings.database).close()
    overridden = Settings(
        database_url=servers.libpq_url(tls_db),
        tls={"ca_file": servers.other_ca_file, "cert_file": servers.cert_file, "key_file": servers.key_file},
    )
    with psycopg.connect(overridden.database, autocommit=True) as conn:
        assert conn.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetchone() == (True,)
