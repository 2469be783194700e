"""Fixtures: each run gets its own vhosts and template database; each test its own database and namespace."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

import tests.workflows as test_workflows
from stepline import Client, Producer
from stepline.shared.settings import EMBEDDED_DATABASE, Settings
from stepline.worker.registry import load_workflows
from stepline.worker.workflow import Workflow
from tests.support import services
from tests.support.databases import RunDatabases
from tests.support.fleet import Fleet, ProcessFleet, process_env
from tests.support.vhosts import RunVhosts

RUN_ID = uuid.uuid4().hex[:8]


@pytest.fixture(scope="session")
def run_vhosts() -> Iterator[RunVhosts]:
    """This test process's RabbitMQ vhosts, all deleted at the end; they must hold no quorum queue."""
    vhosts = RunVhosts(f"stepline-test-{RUN_ID}")
    try:
        yield vhosts
    finally:
        quorum = vhosts.close()
    # The run's vhosts hold thousands of queues: quorum ones belong in ``quorum_vhost``.
    assert not quorum, f"quorum queue(s) were made in the run's vhosts {quorum}: use quorum_vhost"


@pytest.fixture
def vhost(run_vhosts: RunVhosts) -> str:
    """A RabbitMQ vhost of the run's, which tests just before and after this one use too."""
    return run_vhosts.for_test()


@pytest.fixture
def quorum_vhost() -> Iterator[str]:
    """A small vhost of this test's own for quorum queues, emptied queue by queue, then deleted.

    RabbitMQ 3.10 wedged deleting vhosts that held thousands of quorum queues: a
    test of quorum queues declares a few here (serve only the workflows it needs),
    and the teardown fails a test that made more than a handful.
    """
    name = f"stepline-quorum-{RUN_ID}-{uuid.uuid4().hex[:6]}"
    services.create_vhost(name)
    try:
        yield name
        made = services.queue_types(name)
        assert len(made) <= services.QUORUM_VHOST_MAX_QUEUES, (
            f"too many queues for a quorum test: {sorted(made)}"
        )
    finally:
        services.delete_vhost(name)


@pytest.fixture
def quorum_settings(settings: Settings, quorum_vhost: str) -> Settings:
    """The test's settings on its quorum vhost, with quorum queues."""
    return settings.model_copy(
        update={
            "amqp_url": SecretStr(services.amqp_url(quorum_vhost)),
            "broker": settings.broker.model_copy(update={"queue_type": "quorum"}),
        }
    )


@pytest.fixture(scope="session")
def embedded_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded mode's migrated state, made once; each test on SQLite copies the file."""
    folder = tmp_path_factory.mktemp("embedded-template")
    services.create_embedded_state(Settings(embedded=folder).database, folder / EMBEDDED_DATABASE)
    return folder / EMBEDDED_DATABASE


@pytest.fixture(scope="session")
def run_databases() -> Iterator[RunDatabases]:
    """A migrated database that each test clones, and the clones: all dropped at the end."""
    databases = RunDatabases(f"sl_test_{RUN_ID}")
    yield databases
    databases.close()


BACKENDS = ("postgres", "sqlite")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "both_backends: run the test on PostgreSQL + RabbitMQ and on the embedded mode (SQLite files)",
    )
    config.addinivalue_line(
        "markers", "postgres_only(why): in a both_backends module, a test of PostgreSQL or RabbitMQ alone"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests allowed more than the default time (``timeout`` mark) run first, the longest allowed first.

    pytest-xdist hands the tests out in this order, one by one as processes free up:
    a long test handed out last (mypy's, in tests/unit) held up the end of the run
    while the other processes sat idle.
    """
    default_s = float(config.getini("timeout"))
    items.sort(key=lambda item: -max(_timeout_s(item, default_s), default_s))


def _timeout_s(item: pytest.Item, default_s: float) -> float:
    mark = item.get_closest_marker("timeout")
    if mark is None:
        return default_s
    return float(mark.kwargs.get("timeout", mark.args[0] if mark.args else default_s))


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Tests marked ``both_backends`` run once per backend; every other test on PostgreSQL + RabbitMQ."""
    marked = metafunc.definition.get_closest_marker("both_backends")
    if (
        "backend" in metafunc.fixturenames
        and marked
        and not metafunc.definition.get_closest_marker("postgres_only")
    ):
        metafunc.parametrize("backend", BACKENDS)


@pytest.fixture
def backend() -> str:
    """Which backend the test runs on: ``postgres`` (with RabbitMQ) or ``sqlite`` (the embedded mode)."""
    return "postgres"


@pytest.fixture
def database_url(run_databases: RunDatabases) -> Iterator[str]:
    """A database of this test's own, migrated, dropped after."""
    name = run_databases.take()
    yield services.database_url(name)
    run_databases.drop(name)


@pytest.fixture
def namespace() -> str:
    """Exchange and queue names of this test's own."""
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
def settings(
    backend: str,
    namespace: str,
    request: pytest.FixtureRequest,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Settings:
    """Settings for this test: its database and broker namespace (or embedded files), quick timers."""
    quick: dict[str, Any] = {
        "namespace": namespace,
        # The shared node is the single dev node: classic queues (see services.SINGLE_NODE_QUEUE_TYPE).
        "broker": {"queue_type": services.SINGLE_NODE_QUEUE_TYPE},
        "worker": {"concurrency": 8, "shutdown_grace": "5s"},
        "scheduler": {"poll_interval": "100ms"},
        "outbox": {"sweep_interval": "300ms", "sweep_after": "1s"},
    }
    if backend == "sqlite":
        settings = Settings(embedded=tmp_path / "embedded", **quick)
        services.copy_embedded_state(request.getfixturevalue("embedded_template"), tmp_path / "embedded")
    else:
        database_url = request.getfixturevalue("database_url")
        vhost = request.getfixturevalue("vhost")
        settings = Settings(database_url=database_url, amqp_url=services.amqp_url(vhost), **quick)
    # Step code in tests/workflows.py records side effects through this variable.
    monkeypatch.setenv(test_workflows.SIDE_EFFECTS_URL, settings.database)
    return settings


@pytest.fixture(scope="session")
def workflows() -> dict[str, Workflow[Any, Any]]:
    """Every workflow in tests/workflows.py, by name."""
    return load_workflows([test_workflows.__name__])


@pytest.fixture
async def fleet(settings: Settings, workflows: dict[str, Workflow[Any, Any]]) -> AsyncIterator[Fleet]:
    """Start in-process workers and schedulers; all stopped at teardown."""
    running = Fleet(settings, workflows)
    try:
        yield running
    finally:
        await running.stop_all()


@pytest.fixture
def process_fleet(settings: Settings, tmp_path: Path) -> Iterator[ProcessFleet]:
    """Start real worker and scheduler processes; each is ended by its pid, even on failure."""
    running = ProcessFleet(process_env(settings), tmp_path)
    try:
        yield running
    finally:
        running.stop_all()


@pytest.fixture
async def producer(settings: Settings) -> AsyncIterator[Producer]:
    """A connected producer in this test's namespace."""
    async with Producer(settings.amqp, namespace=settings.namespace, broker=settings.broker) as connected:
        yield connected


@pytest.fixture
async def control(settings: Settings) -> AsyncIterator[Client]:
    """A client that can also publish: events, resume, terminate, restart."""
    async with Client(
        settings.database, settings.amqp, namespace=settings.namespace, broker=settings.broker
    ) as connected:
        yield connected


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[Client]:
    """A client on this test's database."""
    async with Client(
        settings.database, settings.amqp, namespace=settings.namespace, broker=settings.broker
    ) as connected:
        yield connected
