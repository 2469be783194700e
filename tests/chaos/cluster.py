"""The chaos workflow on the 3-node RabbitMQ cluster while its nodes die: nothing lost, nothing doubled.

Short form: ``tests/cluster/test_rabbit_cluster.py`` (part of ``make test``). Long
form: ``python -m tests.chaos.cluster --instances 300`` (``make chaos-cluster``):
the node that leads the workflow queue is SIGKILLed and later restarted, then
another node is stopped (and started only after the run), and the run prints
how long the fleet took to commit steps again after each fault.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from stepline.shared.settings import Settings
from stepline.shared.topology import queue_name
from tests.chaos.run import Chaos, Summary
from tests.support import db, services
from tests.support.cluster import NODES, RabbitCluster, node_name

T = TypeVar("T")

# Within this long after a fault, the longest pause between step commits is its time to recover.
RECOVERY_WINDOW_S = 90.0


@dataclass
class NodeFault:
    """One fault of a cluster node: what, which node, when (epoch seconds)."""

    what: str
    node: int
    at: float
    recovery_s: float = 0.0


class ClusterChaos(Chaos):
    """Chaos whose faults are the cluster's nodes: the leader SIGKILLed and restarted, another stopped."""

    def __init__(
        self,
        settings: Settings,
        log_dir: Path,
        cluster: RabbitCluster,
        vhost: str,
        *,
        stop_another: bool,
        seed: int | None = None,
    ) -> None:
        super().__init__(settings, log_dir, seed=seed)
        self.cluster = cluster
        self.vhost = vhost
        self.stop_another = stop_another
        self.node_faults: list[NodeFault] = []
        self.down: set[int] = set()
        self.published = False

    def _up_node(self) -> int:
        return min(set(NODES) - self.down)

    async def _supervised(self, action: Callable[[int], T], node: int) -> T:
        """``action(node)`` in a thread, reviving dead workers meanwhile (a node takes seconds to start)."""
        task = asyncio.create_task(asyncio.to_thread(action, node))
        while not task.done():
            self.revive_dead()
            await asyncio.wait({task}, timeout=0.5)
        return task.result()

    async def _node_fault(self, what: str, node: int) -> None:
        actions = {"SIGKILL": self.cluster.kill, "restart": self.cluster.start, "stop": self.cluster.stop}
        at = time.time()
        await self._supervised(actions[what], node)
        if what == "restart":
            self.down.discard(node)
        else:
            self.down.add(node)
        self.node_faults.append(NodeFault(f"{what} {node_name(node)}", node, at))
        self.summary.faults[f"node {what}"] += 1
        self.fault_times.append(at)

    async def inject(self, until: float) -> None:
        """SIGKILL the workflow queue's leader at 25 %, restart it at 50 %, stop another node at 70 %."""
        started = time.monotonic()
        span = until - started
        plan = [(0.25, "SIGKILL"), (0.5, "restart")] + ([(0.7, "stop")] if self.stop_another else [])
        queue = queue_name(self.settings.namespace, "chaos")
        killed = 0
        for share, what in plan:
            while time.monotonic() < started + share * span:
                self.revive_dead()
                await asyncio.sleep(0.5)
            if what == "SIGKILL":
                killed = await self._supervised(
                    lambda via: self.cluster.leader(self.vhost, queue, via=via), self._up_node()
                )
                await self._node_fault("SIGKILL", killed)
            elif what == "restart":
                await self._node_fault("restart", killed)
            else:
                await self._node_fault("stop", max(set(NODES) - {killed}))
        # Until the last start is out too: a worker killed by a fault must come back meanwhile.
        while time.monotonic() < until or not self.published:
            self.revive_dead()
            await asyncio.sleep(0.5)

    async def publish(self, count: int, spread_s: float) -> None:
        await super().publish(count, spread_s)
        self.published = True

    async def check(self) -> None:
        await super().check()
        finishes = sorted(
            row["finished_at"].timestamp()
            for row in await db.rows(self.settings.database, "SELECT finished_at FROM step_attempts")
        )
        # Each fault's window ends where the next one begins, so that no pause counts twice.
        ends = [fault.at for fault in self.node_faults[1:]] + [float("inf")]
        for fault, end in zip(self.node_faults, ends, strict=True):
            fault.recovery_s = _longest_pause(finishes, fault.at, min(end, fault.at + RECOVERY_WINDOW_S))

    def render(self) -> str:
        lines = [
            self.summary.render(),
            "  node faults (time to recover: longest pause in step commits after it)",
        ]
        lines += [f"    {fault.what:<34} {fault.recovery_s:5.1f}s" for fault in self.node_faults]
        return "\n".join(lines)

    async def restore(self) -> None:
        """Start the nodes this run left down."""
        for node in sorted(self.down):
            await asyncio.to_thread(self.cluster.start, node)
        self.down.clear()


def _longest_pause(finishes: list[float], start: float, end: float) -> float:
    """The longest time without a step commit between ``start`` and ``end`` (or the last commit)."""
    inside = [t for t in finishes if start < t <= end]
    if not inside:
        return 0.0
    marks = [start, *inside]
    return max(later - earlier for earlier, later in itertools.pairwise(marks))


async def run_on_cluster(
    cluster: RabbitCluster,
    database_url: str,
    log_dir: Path,
    *,
    instances: int,
    duration_s: float,
    stop_another: bool,
    seed: int | None = None,
) -> tuple[Summary, str]:
    """One chaos run on the cluster in a vhost of its own; the cluster is whole again afterwards."""
    vhost = f"stepline-cluster-chaos-{uuid.uuid4().hex[:8]}"
    await asyncio.to_thread(cluster.create_vhost, vhost)
    # Quorum queues whatever the environment says: a classic queue lives on one node only.
    settings = Settings(
        database_url=database_url,
        amqp_url=cluster.url(vhost),
        namespace="chaos",
        broker={"queue_type": "quorum"},
    )
    chaos = ClusterChaos(settings, log_dir, cluster, vhost, stop_another=stop_another, seed=seed)
    try:
        summary = await chaos.run(instances=instances, duration_s=duration_s)
        print(chaos.render(), flush=True)
    finally:
        await chaos.restore()
        try:
            await asyncio.to_thread(cluster.delete_vhost, vhost)
        except RuntimeError as exc:  # the run's verdict stands; the vhost goes with the cluster's data
            print(f"could not delete vhost {vhost}: {exc}", flush=True)
    return summary, chaos.render()


def main() -> int:
    """The long form: ``python -m tests.chaos.cluster --instances 300``."""
    import os

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--instances", type=int, default=300)
    parser.add_argument("--duration", type=float, default=150, help="seconds over which faults come")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--keep", action="store_true", help="leave the cluster running afterwards")
    args = parser.parse_args()
    cluster = RabbitCluster()
    database = f"sl_cluster_chaos_{uuid.uuid4().hex[:8]}"
    log_dir = Path(tempfile.mkdtemp(prefix="stepline-cluster-chaos-"))
    print(
        f"chaos-cluster: {args.instances} instances over {args.duration:.0f}s, logs in {log_dir}", flush=True
    )
    try:
        cluster.up()
        services.create_template(database)
        # Step code records its side effects in this database (tests/workflows.py reads the variable).
        os.environ["STEPLINE_DATABASE_URL"] = services.database_url(database)
        # run_on_cluster prints the summary as soon as the run ends, before the clean-up.
        summary, _ = asyncio.run(
            run_on_cluster(
                cluster,
                services.database_url(database),
                log_dir,
                instances=args.instances,
                duration_s=args.duration,
                stop_another=True,
                seed=args.seed,
            )
        )
    finally:
        services.drop_database(database)
        if not args.keep:
            cluster.down()
    return 0 if summary.ok else 1


if __name__ == "__main__":
    sys.exit(main())
