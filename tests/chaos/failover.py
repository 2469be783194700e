"""The chaos workflow on a primary and its synchronous standby while the primary dies and the standby rises.

Short form: ``tests/e2e/test_failover.py`` (part of ``make test``). Long form:
``python -m tests.chaos.failover --instances 300`` (``make chaos-failover``).
Both run on the pair of ``scripts/postgres-standby.sh`` (ports 5441/5442), never
on the shared server; the processes name both hosts in
``STEPLINE_DATABASE_URL`` and must find the new primary by themselves.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

from stepline.shared.settings import Settings
from tests.chaos.run import Chaos, Summary
from tests.support import db, pg_pair, services

CLIENTS_AT_ONCE = 10
FAILOVER = "primary stopped -m immediate, standby promoted"
FAILOVER_WAIT_S = 300
"""How long past the run's end the failover may wait for the work to get going."""
KEEP_PAIR = "STEPLINE_KEEP_FAILED_PAIR"
"""Set to keep a pair whose run failed, to look at its rows (drop it with postgres-standby.sh down)."""


class FailoverChaos(Chaos):
    """``Chaos`` whose only server fault is one failover, once ``at`` of the starts are out and committing."""

    def __init__(
        self, settings: Settings, log_dir: Path, *, at: float = 0.4, seed: int | None = None
    ) -> None:
        super().__init__(settings, log_dir, seed=seed)
        self.at = at
        self.planned = 0
        self.failover_s = 0.0
        self.processes_that_saw_it = 0
        # The base run opens a Client per event: hundreds at once after an outage would take
        # the whole server's max_connections (the fleet's budget is what is under test).
        self.clients = asyncio.Semaphore(CLIENTS_AT_ONCE)

    async def run(self, *, instances: int, duration_s: float, settle_s: float = 240.0) -> Summary:
        """The base run; then count the processes that logged the outage (the failover hit them live)."""
        self.planned = instances
        summary = await super().run(instances=instances, duration_s=duration_s, settle_s=settle_s)
        self.processes_that_saw_it = sum(
            "event=outage_started" in self.fleet.log(name) for name in self.fleet.processes
        )
        return summary

    async def send_event_later(self, instance_id: str, n: int) -> None:
        """As the base run does, with at most ``CLIENTS_AT_ONCE`` clients connected at once."""
        async with self.clients:
            await super().send_event_later(instance_id, n)

    async def inject(self, until: float) -> None:
        """Fail over once, mid-work; meanwhile restart what the fault points kill, as a supervisor would.

        Mid-work, not at a fixed time: on a busy machine the processes may take
        longer to start than the run's first seconds.
        """
        deadline = until + FAILOVER_WAIT_S
        while not self.summary.faults[FAILOVER]:
            if time.monotonic() > deadline:
                raise RuntimeError("the work never got going: no failover was injected")
            await asyncio.sleep(1.0)
            self.revive_dead()
            if await self.work_is_flowing():
                self.summary.faults[FAILOVER] += 1
                self.fault_times.append(time.time())
                self.failover_s = await asyncio.to_thread(pg_pair.failover)
        while time.monotonic() < until:
            await asyncio.sleep(1.0)
            self.revive_dead()

    async def work_is_flowing(self) -> bool:
        """Whether ``at`` of the planned starts are published and steps commit."""
        if len(self.instance_ids) < self.at * self.planned:
            return False
        with contextlib.suppress(Exception):  # not yet, whatever the reason
            committed = await db.scalar(self.settings.database, "SELECT count(*) FROM step_attempts")
            return int(committed) > 0
        return False


async def run_on_pair(
    log_dir: Path, *, instances: int, duration_s: float, seed: int | None = None, settle_s: float = 240
) -> tuple[Summary, FailoverChaos]:
    """Bring a fresh pair up, run the chaos workflow through a failover, drop the pair; always."""
    run = uuid.uuid4().hex[:8]
    database, vhost = f"sl_failover_{run}", f"stepline-failover-{run}"
    with pg_pair.exclusive():
        return await _run_on_pair(
            log_dir, database, vhost, instances=instances, duration_s=duration_s, seed=seed, settle_s=settle_s
        )


async def _run_on_pair(
    log_dir: Path,
    database: str,
    vhost: str,
    *,
    instances: int,
    duration_s: float,
    seed: int | None,
    settle_s: float,
) -> tuple[Summary, FailoverChaos]:
    await asyncio.to_thread(pg_pair.pair_up)
    services.create_vhost(vhost)
    keep = False
    try:
        run = database.rsplit("_", 1)[-1]
        url = pg_pair.pair_url(database)
        admin = pg_pair.direct_url("postgres")
        await asyncio.to_thread(pg_pair.create_database, admin, database, url)
        settings = Settings(
            database_url=url,
            amqp_url=services.amqp_url(vhost),
            namespace=f"fo{run}",
            broker={"queue_type": services.SINGLE_NODE_QUEUE_TYPE},  # the shared single node
        )
        chaos = FailoverChaos(settings, log_dir, seed=seed)
        summary = await chaos.run(instances=instances, duration_s=duration_s, settle_s=settle_s)
        keep = not summary.ok and bool(os.environ.get(KEEP_PAIR))
        return summary, chaos
    finally:
        services.delete_vhost(vhost)
        if keep:
            print(f"the failed run's pair is kept: database {database} on port {pg_pair.STANDBY_PORT}")
        else:
            await asyncio.to_thread(pg_pair.pair_down)


def main() -> int:
    """The long form: ``python -m tests.chaos.failover --instances 300``."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--instances", type=int, default=300)
    parser.add_argument("--duration", type=float, default=120, help="seconds over which starts are spread")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--settle", type=float, default=600, help="seconds to wait for the rest to finish")
    args = parser.parse_args()
    log_dir = Path(tempfile.mkdtemp(prefix="stepline-failover-"))
    print(
        f"failover chaos: {args.instances} instances over {args.duration:.0f}s, logs in {log_dir}", flush=True
    )
    summary, chaos = asyncio.run(
        run_on_pair(
            log_dir, instances=args.instances, duration_s=args.duration, seed=args.seed, settle_s=args.settle
        )
    )
    print(summary.render())
    print(f"  failover took        {chaos.failover_s:.1f}s (stop -m immediate + promote)")
    print(f"  processes that saw it {chaos.processes_that_saw_it} (logged the outage)")
    return 0 if summary.ok else 1


if __name__ == "__main__":
    sys.exit(main())
