"""Stepline on a 3-node RabbitMQ cluster (scripts/rabbitmq-cluster.sh): nodes die, the fleet goes on.

The cluster is started once for this module and stopped by pid at its end, even
on failure. Its tests break nodes, so they run one after another in one process
(xdist group "rabbit-cluster").
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

import tests.workflows as test_workflows
from stepline import Client, Producer
from stepline.shared.broker import AmqpBroker
from stepline.shared.settings import Settings
from stepline.shared.topology import queue_name
from stepline.worker.workflow import Workflow
from tests.chaos.cluster import run_on_cluster
from tests.cluster_workflows import POISON_EXIT_CODE
from tests.support.cluster import RabbitCluster
from tests.support.fleet import Fleet, ProcessFleet, process_env, until_consuming
from tests.support.polling import eventually

# The first test is the short form `make test` runs (about a minute, most of it the
# cluster starting); the rest are marked `cluster`: `make chaos-cluster` runs them all.
pytestmark = [
    pytest.mark.e2e,
    pytest.mark.xdist_group("rabbit-cluster"),
    pytest.mark.timeout(600),
]

SEQUENCE_OUTPUT = {"total": 7, "product": 70, "text": "result=70"}


@pytest.fixture(scope="module")
def rabbit_cluster() -> Iterator[RabbitCluster]:
    """The 3-node cluster, up for this module; every node stopped by its pid afterwards."""
    cluster = RabbitCluster()
    try:
        cluster.up()
        yield cluster
    finally:
        cluster.down()


@pytest.fixture
def cluster_settings(
    rabbit_cluster: RabbitCluster, database_url: str, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Settings]:
    """Settings on the test's database and a vhost of its own on the cluster, every node named in order.

    Nothing here touches the shared RabbitMQ node.
    """
    vhost = f"stepline-cluster-{uuid.uuid4().hex[:8]}"
    rabbit_cluster.create_vhost(vhost)
    settings = Settings(
        database_url=database_url,
        amqp_url=rabbit_cluster.url(vhost, in_order=True),
        namespace=namespace,
        broker={"queue_type": "quorum"},  # the suite's default is classic (tests/conftest.py)
        worker={"concurrency": 8, "shutdown_grace": "5s"},
        scheduler={"poll_interval": "100ms"},
        outbox={"sweep_interval": "300ms", "sweep_after": "1s"},
    )
    # Step code in tests/workflows.py records side effects through this variable.
    monkeypatch.setenv(test_workflows.SIDE_EFFECTS_URL, settings.database)
    try:
        yield settings
    finally:
        # Best effort: a test that stopped or killed nodes may leave none able to answer yet,
        # and the module's cluster (vhosts and all) is torn down after its last test anyway.
        with contextlib.suppress(RuntimeError):
            rabbit_cluster.delete_vhost(vhost, via=2)


@pytest.fixture
async def whole_again(rabbit_cluster: RabbitCluster) -> AsyncIterator[set[int]]:
    """Nodes a test takes down: started again at its end, whatever happened."""
    down: set[int] = set()
    try:
        yield down
    finally:
        for node in sorted(down):
            await asyncio.to_thread(rabbit_cluster.start, node)


async def test_a_worker_that_loses_its_node_moves_to_another_and_consumes_again(
    rabbit_cluster: RabbitCluster,
    cluster_settings: Settings,
    workflows: dict[str, Workflow[Any, Any]],
    whole_again: set[int],
) -> None:
    fleet = Fleet(cluster_settings, workflows)
    await fleet.start_worker()  # the URL lists node 1 first: the worker connects there
    # The producer lists the other nodes only: it never needs node 1.
    producer_url = cluster_settings.amqp.replace("127.0.0.1:5681,", "")
    try:
        async with (
            Producer(producer_url, namespace=cluster_settings.namespace) as producer,
            Client(cluster_settings.database) as client,
        ):
            first = await producer.start("sequence", {"a": 2, "b": 5})
            assert (await client.wait(first, timeout=60)).output == SEQUENCE_OUTPUT

            await asyncio.to_thread(rabbit_cluster.kill, 1)
            whole_again.add(1)
            # Node 1 stays down: only a worker that reconnected elsewhere and restored its
            # consumers can run these.
            after = [await producer.start("sequence", {"a": 2, "b": 5}) for _ in range(3)]
            for instance_id in after:
                assert (await client.wait(instance_id, timeout=90)).output == SEQUENCE_OUTPUT
    finally:
        await fleet.stop_all()


@pytest.mark.cluster
async def test_a_message_that_kills_its_worker_every_time_is_dead_lettered_after_the_delivery_limit(
    rabbit_cluster: RabbitCluster, cluster_settings: Settings, tmp_path: Path
) -> None:
    env = process_env(cluster_settings)
    env["STEPLINE_BROKER__DELIVERY_LIMIT"] = "3"
    fleet = ProcessFleet(env, tmp_path)
    command = ("stepline-worker", "--workflows", "tests.workflows", "--workflows", "tests.cluster_workflows")
    restarts = 0
    fleet.start("worker.0", *command)
    namespace = cluster_settings.namespace
    broker = AmqpBroker(cluster_settings.amqp, namespace)
    try:
        await until_consuming(cluster_settings, ["poison", "sequence"])
        await broker.connect()
        async with (
            Producer(cluster_settings.amqp, namespace=namespace) as producer,
            Client(cluster_settings.database) as client,
        ):
            poisoned = await producer.start("poison", None)
            others = [await producer.start("sequence", {"a": 2, "b": 5}) for _ in range(4)]

            async def dead_lettered() -> list[str]:
                nonlocal restarts
                current = fleet.processes[f"worker.{restarts}"]
                if current.poll() is not None:  # the supervisor's part: start a new worker
                    assert current.returncode == POISON_EXIT_CODE, fleet.log(f"worker.{restarts}")
                    restarts += 1
                    fleet.start(f"worker.{restarts}", *command)
                return [letter.reason for letter in await broker.dead_letters()]

            reasons = await eventually(dead_lettered, timeout=180, what="the poison step dead-lettered")
            assert reasons == [
                f"dead-lettered by RabbitMQ (delivery_limit) from queue {queue_name(namespace, 'poison')!r}"
            ]
            assert restarts >= 3  # each delivery killed a worker
            for instance_id in others:
                assert (await client.wait(instance_id, timeout=90)).output == SEQUENCE_OUTPUT
            info = await client.get(poisoned)
            assert info is not None and info.status == "running"
    finally:
        await broker.close()
        fleet.stop_all()


@pytest.mark.cluster
async def test_the_chaos_workflow_loses_nothing_while_the_queue_leader_is_killed_and_restarted(
    rabbit_cluster: RabbitCluster, database_url: str, tmp_path: Path
) -> None:
    summary, text = await run_on_cluster(
        rabbit_cluster, database_url, tmp_path, instances=30, duration_s=30, stop_another=False, seed=11
    )
    assert summary.faults["node SIGKILL"] == summary.faults["node restart"] == 1
    # ok: all complete with the right output; none lost, no commit or event taken twice, nothing left over.
    assert summary.ok, text
    assert summary.completed == summary.instances == 30
