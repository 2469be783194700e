"""Drive the chaos suite: run instances while faults are injected, then check by SQL that nothing was lost.

Short form: ``tests/chaos/test_chaos.py`` (part of ``make test``). Long form:
``python -m tests.chaos.run --duration 600`` (``make chaos``), on its own
database and vhost.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stepline import Client, Producer
from stepline.shared.errors import (
    BrokerError,
    InstanceNotFoundError,
    SteplineError,
    StorageError,
    UnregisteredWorkflowError,
)
from stepline.shared.settings import Settings
from tests.chaos.workflow import STEPS_PER_INSTANCE, expected_output
from tests.support import db
from tests.support.fleet import ProcessFleet, process_env

WORKERS = 3
SCHEDULERS = 2
FAULTS = "crash_after_commit=0.01,duplicate_publish=0.05"


@dataclass
class Summary:
    """What the chaos run did and what it found."""

    instances: int = 0
    completed: int = 0
    lost: int = 0
    wrong_output: int = 0
    duplicated_commits: int = 0
    events_taken_twice: int = 0
    unsent_outbox_rows: int = 0
    unfired_timers: int = 0
    step_runs: int = 0
    committed_steps: int = 0
    faults: Counter[str] = field(default_factory=Counter)
    longest_recovery_s: float = 0.0
    duration_s: float = 0.0

    @property
    def ok(self) -> bool:
        return (
            self.instances > 0
            and self.completed == self.instances
            and self.lost == self.wrong_output == self.duplicated_commits == 0
            and self.events_taken_twice == self.unsent_outbox_rows == self.unfired_timers == 0
        )

    def assert_nothing_lost(self, instances: int) -> None:
        """What every chaos test asserts: all ``instances`` complete, right, once, nothing left over."""
        assert self.lost == 0
        assert self.wrong_output == 0
        assert self.duplicated_commits == 0
        assert self.events_taken_twice == 0
        assert self.unsent_outbox_rows == 0
        assert self.unfired_timers == 0
        assert self.completed == self.instances == instances
        assert self.step_runs >= self.committed_steps

    def render(self) -> str:
        faults = ", ".join(f"{name} {count}" for name, count in sorted(self.faults.items())) or "none"
        return "\n".join(
            [
                "chaos summary",
                f"  instances            {self.instances} ({self.completed} complete)",
                f"  faults injected      {sum(self.faults.values())}: {faults}",
                f"  lost                 {self.lost}",
                f"  wrong output         {self.wrong_output}",
                f"  duplicated commits   {self.duplicated_commits}",
                f"  events taken twice   {self.events_taken_twice}",
                f"  unsent outbox rows   {self.unsent_outbox_rows}",
                f"  unfired timers       {self.unfired_timers}",
                f"  step runs/commits    {self.step_runs}/{self.committed_steps} (at least once)",
                f"  longest recovery     {self.longest_recovery_s:.1f}s",
                f"  duration             {self.duration_s:.0f}s",
                f"  verdict              {'PASS' if self.ok else 'FAIL'}",
            ]
        )


class Chaos:
    """One chaos run against the given settings (its own database and namespace)."""

    def __init__(self, settings: Settings, log_dir: Path, *, seed: int | None = None) -> None:
        self.settings = settings
        self.env = process_env(settings)
        self.env.update(STEPLINE_FAULTS=FAULTS, STEPLINE_WORKER__CONCURRENCY="8")
        self.fleet = ProcessFleet(self.env, log_dir)
        self.random = random.Random(seed)
        self.summary = Summary()
        self.fault_times: list[float] = []
        self.incarnation: Counter[str] = Counter()
        self.instance_ids: list[str] = []
        self.prefix = f"chaos-{uuid.uuid4().hex[:6]}"
        self.senders: set[asyncio.Task[None]] = set()

    # -------------------------------------------------------------- processes

    def start(self, role: str) -> None:
        self.incarnation[role] += 1
        name = f"{role}.{self.incarnation[role]}"
        if role.startswith("w"):
            self.fleet.start(
                name, "stepline-worker", "--workflows", "tests.chaos.workflow", "--worker-id", name
            )
        else:
            self.fleet.start(name, "stepline-scheduler")

    def current(self, role: str) -> str:
        return f"{role}.{self.incarnation[role]}"

    def roles(self) -> list[str]:
        return [f"w{n}" for n in range(1, WORKERS + 1)] + [f"s{n}" for n in range(1, SCHEDULERS + 1)]

    def revive_dead(self) -> None:
        """Restart any process that died (a fault point killed it) as a supervisor would."""
        for role in self.roles():
            process = self.fleet.processes.get(self.current(role))
            if process is not None and process.poll() is not None:
                self.summary.faults["crash after commit, before ack"] += 1
                self.fault_times.append(time.time())
                self.start(role)

    # -------------------------------------------------------------- work

    async def publish(self, count: int, spread_s: float) -> None:
        """Start ``count`` instances evenly over ``spread_s`` seconds, whatever the broker does."""
        async with Producer.from_settings(self.settings) as producer:
            # The namespace is new: a start is refused until a worker registered the workflow.
            await _retry(_registered, producer, "chaos", self.settings.namespace)
            for n in range(count):
                instance_id = f"{self.prefix}-{n}"
                self.instance_ids.append(instance_id)
                await _retry(producer.start, "chaos", {"n": n}, instance_id=instance_id)
                sender = asyncio.create_task(self.send_event_later(instance_id, n))
                self.senders.add(sender)
                sender.add_done_callback(self.senders.discard)
                await asyncio.sleep(spread_s / max(count, 1))

    async def send_event_later(self, instance_id: str, n: int) -> None:
        """Send the instance its event, sometimes before it waits, mostly after."""
        await asyncio.sleep(self.random.uniform(0.2, 4.0))
        while True:
            try:
                # Connecting is part of what an outage can break: it is inside the retry too.
                async with Client(
                    self.settings.database,
                    self.settings.amqp,
                    namespace=self.settings.namespace,
                    broker=self.settings.broker,
                ) as client:
                    await client.send_event(instance_id, "go", {"n": n}, event_id=f"go-{instance_id}")
                return
            except InstanceNotFoundError:
                await asyncio.sleep(0.5)  # its start has not been consumed yet
            except (StorageError, BrokerError, OSError):
                await asyncio.sleep(1.0)  # an outage: try again

    # -------------------------------------------------------------- faults

    async def inject(self, until: float) -> None:
        """Kill and restart processes at random; restart RabbitMQ and PostgreSQL once each."""
        started = time.monotonic()
        span = until - started
        broker_done = database_done = False
        while time.monotonic() < until:
            await asyncio.sleep(self.random.uniform(1.5, 4.0))
            self.revive_dead()
            elapsed = (time.monotonic() - started) / span
            if not broker_done and elapsed > 0.3:
                broker_done = True
                await self.fault("rabbitmq restart", restart_rabbitmq)
            elif not database_done and elapsed > 0.6:
                database_done = True
                await self.fault("postgresql restart", restart_postgresql)
            else:
                role = self.random.choice(self.roles())
                kind = "worker SIGKILL" if role.startswith("w") else "scheduler SIGKILL"
                self.fleet.kill(self.current(role))
                self.summary.faults[kind] += 1
                self.fault_times.append(time.time())
                self.start(role)

    async def fault(self, name: str, action: Callable[[], None]) -> None:
        self.summary.faults[name] += 1
        self.fault_times.append(time.time())
        await asyncio.to_thread(action)

    # -------------------------------------------------------------- the run

    async def run(self, *, instances: int, duration_s: float, settle_s: float = 240.0) -> Summary:
        began = time.monotonic()
        for role in self.roles():
            self.start(role)
        try:
            until = began + duration_s
            await asyncio.gather(self.publish(instances, spread_s=duration_s * 0.7), self.inject(until))
            self.revive_dead()
            await self.wait_for_all(settle_s)
            for sender in list(self.senders):
                sender.cancel()
        finally:
            self.fleet.stop_all()
        await self.check()
        self.summary.duration_s = time.monotonic() - began
        return self.summary

    async def wait_for_all(self, settle_s: float) -> None:
        deadline = time.monotonic() + settle_s
        while time.monotonic() < deadline:
            self.revive_dead()
            with contextlib.suppress(Exception):
                finished = await db.scalar(
                    self.settings.database,
                    "SELECT count(*) FROM instances WHERE workflow = 'chaos' AND finished_at IS NOT NULL",
                )
                outbox = await db.scalar(self.settings.database, "SELECT count(*) FROM outbox")
                if finished == len(self.instance_ids) and outbox == 0:
                    return
            await asyncio.sleep(1.0)

    async def check(self) -> None:
        """Count by SQL what a user would check: outputs, commits, leftovers."""
        url = self.settings.database
        s = self.summary
        s.instances = len(self.instance_ids)
        rows = await db.rows(url, "SELECT id, status, params, output FROM instances WHERE workflow = 'chaos'")
        by_id = {row["id"]: row for row in rows}
        for instance_id in self.instance_ids:
            row = by_id.get(instance_id)
            if row is None or row["status"] != "complete":
                s.lost += 1
                continue
            s.completed += 1
            if row["output"] != expected_output(row["params"]["n"]):
                s.wrong_output += 1
        s.duplicated_commits = int(
            await db.scalar(
                url,
                "SELECT count(*) FROM (SELECT instance_id, name, occurrence FROM step_attempts"
                " WHERE outcome = 'succeeded' GROUP BY 1, 2, 3 HAVING count(*) > 1) AS doubled",
            )
        )
        s.committed_steps = int(
            await db.scalar(url, "SELECT count(*) FROM steps WHERE kind = 'step' AND status = 'succeeded'")
        )
        s.step_runs = int(await db.scalar(url, "SELECT count(*) FROM side_effects"))
        expected_steps = s.completed * len(STEPS_PER_INSTANCE)
        if s.committed_steps != expected_steps:
            s.duplicated_commits += abs(s.committed_steps - expected_steps)
        s.events_taken_twice = int(
            await db.scalar(
                url,
                "SELECT count(*) FROM (SELECT instance_id FROM events WHERE consumed_step IS NOT NULL"
                " GROUP BY instance_id HAVING count(*) > 1) AS doubled",
            )
        )
        s.unsent_outbox_rows = int(await db.scalar(url, "SELECT count(*) FROM outbox"))
        s.unfired_timers = int(await db.scalar(url, "SELECT count(*) FROM timers"))
        finishes = [
            row["finished_at"].timestamp()
            for row in await db.rows(url, "SELECT finished_at FROM step_attempts ORDER BY finished_at")
        ]
        s.longest_recovery_s = max(
            (min((t for t in finishes if t > fault), default=fault) - fault for fault in self.fault_times),
            default=0.0,
        )


async def _retry(action: Callable[..., Awaitable[object]], *args: Any, **kwargs: Any) -> None:
    """Call until it succeeds: the driver itself must ride out the outages it causes."""
    delay = 0.2
    while True:
        try:
            await action(*args, **kwargs)
            return
        except (BrokerError, StorageError, OSError, SteplineError):
            await asyncio.sleep(delay)
            delay = min(delay * 2, 3.0)


async def _registered(producer: Producer, workflow: str, namespace: str) -> None:
    """Raise until a worker serving ``workflow`` declared its queue (ran in the namespace)."""
    if await producer.workflow_queue(workflow) is None:
        raise UnregisteredWorkflowError(workflow, namespace)


def _wait_for(check: list[str], what: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if subprocess.run(check, capture_output=True).returncode == 0:
            return
        time.sleep(0.5)
    raise RuntimeError(f"{what} did not come back within {timeout_s:.0f}s")


def restart_rabbitmq() -> None:
    """Stop and start the RabbitMQ application: every connection drops, durable state stays."""
    subprocess.run(["rabbitmqctl", "-q", "stop_app"], check=True, capture_output=True)
    time.sleep(2)
    subprocess.run(["rabbitmqctl", "-q", "start_app"], check=True, capture_output=True)
    _wait_for(["rabbitmq-diagnostics", "-q", "check_port_connectivity"], "RabbitMQ")


def restart_postgresql() -> None:
    """Restart the PostgreSQL cluster (fast shutdown: every session is cut)."""
    version = sorted(path.name for path in Path("/etc/postgresql").iterdir())[-1]
    subprocess.run(
        ["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "restart", "-m", "fast"],
        check=True,
        capture_output=True,
    )
    _wait_for(["pg_isready", "-h", "127.0.0.1", "-p", "5432"], "PostgreSQL")


def main() -> int:
    """The long form: ``python -m tests.chaos.run --duration 600``."""
    from tests.support import services

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--duration", type=float, default=600, help="seconds of faults (default 600)")
    parser.add_argument("--rate", type=float, default=3.0, help="instances started per second")
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args()
    run = uuid.uuid4().hex[:8]
    database, vhost = f"sl_chaos_{run}", f"stepline-chaos-{run}"
    services.create_template(database)
    services.create_vhost(vhost)
    settings = Settings(
        database_url=services.database_url(database),
        amqp_url=services.amqp_url(vhost),
        namespace="chaos",
        broker={"queue_type": services.SINGLE_NODE_QUEUE_TYPE},  # the shared single node
    )
    log_dir = Path(tempfile.mkdtemp(prefix="stepline-chaos-"))
    print(f"chaos: {args.duration:.0f}s of faults, logs in {log_dir}", flush=True)
    try:
        import os

        os.environ["STEPLINE_DATABASE_URL"] = settings.database
        summary = asyncio.run(
            Chaos(settings, log_dir, seed=args.seed).run(
                instances=int(args.duration * args.rate * 0.7), duration_s=args.duration
            )
        )
    finally:
        services.drop_database(database)
        services.delete_vhost(vhost)
    print(summary.render())
    return 0 if summary.ok else 1


if __name__ == "__main__":
    sys.exit(main())
