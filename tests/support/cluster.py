"""The 3-node RabbitMQ cluster of ``scripts/rabbitmq-cluster.sh``, driven from tests and the chaos runs."""

from __future__ import annotations

import json
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "rabbitmq-cluster.sh"
NODES = (1, 2, 3)
AMQP_PORTS = {n: 5680 + n for n in NODES}
# Starting three nodes from nothing takes ~30 s on an idle machine; a busy one needs more.
SCRIPT_TIMEOUT_S = 300


def node_name(n: int) -> str:
    """The Erlang node name of node ``n``."""
    return f"stepline-c{n}@localhost"


def node_of(name: str) -> int:
    """The number of the node named ``name`` (``stepline-c2@localhost`` is 2)."""
    for n in NODES:
        if name == node_name(n):
            return n
    raise ValueError(f"{name!r} is not a node of the test cluster")


@dataclass
class RabbitCluster:
    """Start, stop and break nodes of the test cluster; every process is ended by its pid (the script's)."""

    def run(self, *args: str, timeout_s: float = SCRIPT_TIMEOUT_S) -> str:
        """Run the script with ``args``; its output, or an error showing it."""
        done = subprocess.run(
            ["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout_s, check=False
        )
        if done.returncode != 0:
            raise RuntimeError(f"rabbitmq-cluster.sh {' '.join(args)} failed:\n{done.stdout}{done.stderr}")
        return done.stdout

    def up(self) -> None:
        self.run("up")

    def down(self) -> None:
        self.run("down")

    def kill(self, n: int) -> None:
        """SIGKILL node ``n``."""
        self.run("kill", str(n))

    def stop(self, n: int) -> None:
        """Stop node ``n`` cleanly."""
        self.run("stop", str(n))

    def start(self, n: int) -> None:
        """Start node ``n`` again; returns once it accepts connections."""
        self.run("start", str(n))

    def ctl(self, n: int, *args: str) -> str:
        """``rabbitmqctl ARGS`` on node ``n``, tried three times.

        The CLI is an Erlang node of its own: on a busy machine it now and then
        fails to start its distribution (``nodistribution``) before it asks anything.
        """
        for attempt in range(3):
            try:
                return self.run("ctl", str(n), "-q", *args, timeout_s=120)
            except RuntimeError:
                if attempt == 2:
                    raise
                time.sleep(1)
        raise AssertionError("unreachable")

    def create_vhost(self, name: str, *, via: int = 1) -> None:
        """A vhost that guest may use fully (the cluster shares it)."""
        self.ctl(via, "add_vhost", name)
        self.ctl(via, "set_permissions", "-p", name, "guest", ".*", ".*", ".*")

    def delete_vhost(self, name: str, *, via: int = 1) -> None:
        """Delete a vhost through node ``via``, or through any other node that is up.

        A test that stopped or killed a node may end while it is still coming back.
        """
        errors = []
        for node in (via, *(n for n in NODES if n != via)):
            try:
                self.ctl(node, "delete_vhost", name)
                return
            except RuntimeError as exc:
                errors.append(str(exc))
        raise RuntimeError("no node could delete vhost " + repr(name) + ":\n" + "\n".join(errors))

    def url(self, vhost: str, *, nodes: tuple[int, ...] = NODES, in_order: bool = False) -> str:
        """``STEPLINE_AMQP_URL`` naming ``nodes`` (tried in that order if ``in_order``)."""
        hosts = ",".join(f"127.0.0.1:{AMQP_PORTS[n]}" for n in nodes)
        query = "?load_balance_hosts=disable" if in_order else ""
        return f"amqp://guest:guest@{hosts}/{quote(vhost, safe='')}{query}"

    def leader(self, vhost: str, queue: str, *, via: int, timeout_s: float = 60) -> int:
        """The node that leads quorum queue ``queue`` (asked of node ``via``)."""
        deadline = time.monotonic() + timeout_s
        while True:
            listed = json.loads(
                self.ctl(via, "list_queues", "-p", vhost, "name", "leader", "--formatter", "json")
            )
            leaders = [row.get("leader") for row in listed if row.get("name") == queue]
            if leaders and isinstance(leaders[0], str) and leaders[0].startswith("stepline-c"):
                return node_of(leaders[0])
            if time.monotonic() >= deadline:
                raise RuntimeError(f"no leader for queue {queue!r} in vhost {vhost!r}: {listed}")
            time.sleep(0.5)
