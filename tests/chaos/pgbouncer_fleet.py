"""A fleet of worker and scheduler processes through PgBouncer in transaction pooling mode.

Each process keeps within its connection budget (counted by application_name in
PgBouncer's ``SHOW CLIENTS``) while PgBouncer holds at most its pool of server
connections. Short form: ``tests/e2e/test_pgbouncer.py``; long form (12 workers
with concurrency 16): ``python -m tests.chaos.pgbouncer_fleet`` (``make chaos-failover``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
from pydantic import SecretStr

from stepline import Client, Producer
from stepline.shared.errors import UnregisteredWorkflowError
from stepline.shared.settings import DatabaseSettings, Settings
from tests.chaos.workflow import STEPS_PER_INSTANCE, expected_output
from tests.support import db, pg_pair, services
from tests.support.fleet import ProcessFleet, process_env


@dataclass
class FleetReport:
    """What the fleet did, and the most connections each kind of process held at once."""

    workers: int
    concurrency: int
    budget: int
    instances: int
    completed: int = 0
    wrong_output: int = 0
    duplicated_commits: int = 0
    most_clients_per_worker: int = 0
    most_clients_per_scheduler: int = 0
    most_server_connections: int = 0
    pool_size: int = 0
    duration_s: float = 0.0
    errors_in_logs: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return (
            self.completed == self.instances
            and self.wrong_output == self.duplicated_commits == 0
            and self.most_clients_per_worker <= self.budget
            and self.most_server_connections <= self.pool_size
            and not self.errors_in_logs
        )

    def render(self) -> str:
        return "\n".join(
            [
                "pgbouncer fleet summary (transaction pooling)",
                f"  fleet                {self.workers} workers x {self.concurrency} steps, 1 scheduler",
                f"  instances            {self.instances} ({self.completed} complete)",
                f"  wrong output         {self.wrong_output}",
                f"  duplicated commits   {self.duplicated_commits}",
                f"  most connections     {self.most_clients_per_worker} per worker (budget {self.budget}), "
                f"{self.most_clients_per_scheduler} per scheduler",
                f"  server connections   {self.most_server_connections} (PgBouncer pool {self.pool_size})",
                f"  prepared-statement errors in logs  {len(self.errors_in_logs)}",
                f"  duration             {self.duration_s:.0f}s",
                f"  verdict              {'PASS' if self.ok else 'FAIL'}",
            ]
        )


BOUNCER_ERRORS = ("prepared statement", "DuplicatePreparedStatement", "InvalidSqlStatementName")
"""What a process logs when it uses server-side prepared statements through transaction pooling."""


async def _admin_rows(query: str) -> list[dict[str, object]]:
    url = pg_pair.direct_url("pgbouncer", pg_pair.PGBOUNCER_PORT)
    async with await psycopg.AsyncConnection.connect(url, autocommit=True, prepare_threshold=None) as conn:
        cursor = await conn.execute(query, prepare=False)
        names = [column.name for column in cursor.description or []]
        return [dict(zip(names, row, strict=True)) for row in await cursor.fetchall()]


async def _sample(report: FleetReport, database: str, stop: asyncio.Event) -> None:
    """Count each process's client connections and the server connections, until ``stop``."""
    while not stop.is_set():
        with contextlib.suppress(psycopg.Error):
            per_process = Counter(str(row["application_name"]) for row in await _admin_rows("SHOW CLIENTS"))
            workers = [n for name, n in per_process.items() if name.startswith("stepline-worker")]
            schedulers = [n for name, n in per_process.items() if name.startswith("stepline-scheduler")]
            report.most_clients_per_worker = max([report.most_clients_per_worker, *workers])
            report.most_clients_per_scheduler = max([report.most_clients_per_scheduler, *schedulers])
            servers = sum(
                int(str(row[column]))
                for row in await _admin_rows("SHOW POOLS")
                if row["database"] == database
                for column in ("sv_active", "sv_idle", "sv_used", "sv_tested", "sv_login")
            )
            report.most_server_connections = max(report.most_server_connections, servers)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.2)


async def run_fleet(
    settings: Settings,
    log_dir: Path,
    *,
    upstream_port: int,
    database: str,
    workers: int,
    concurrency: int,
    instances: int,
    pool_size: int,
    budget: int | None = None,
) -> FleetReport:
    """Run ``instances`` chaos instances on ``workers`` worker processes and a scheduler through PgBouncer.

    ``settings`` name the database directly (on ``upstream_port``); the fleet
    reaches it through PgBouncer, with ``STEPLINE_DATABASE__PGBOUNCER=true``.
    """
    report = FleetReport(workers, concurrency, budget or concurrency + 2, instances, pool_size=pool_size)
    bouncer_dir = _bouncer_folder()
    via_bouncer = pg_pair.direct_url(database, pg_pair.PGBOUNCER_PORT)
    bounced = settings.model_copy(
        update={"database_url": SecretStr(via_bouncer), "db": DatabaseSettings(pgbouncer=True)}
    )
    env = process_env(bounced)
    env.update(
        STEPLINE_DATABASE__PGBOUNCER="true",
        STEPLINE_WORKER__CONCURRENCY=str(concurrency),
        STEPLINE_TEST_SIDE_EFFECTS_URL=via_bouncer,
    )
    if budget is not None:
        env.update(STEPLINE_DATABASE__MAX_CONNECTIONS=str(budget))
    fleet = ProcessFleet(env, log_dir)
    began = time.monotonic()
    stop = asyncio.Event()
    await asyncio.to_thread(pg_pair.pgbouncer_up, bouncer_dir, upstream_port, pool_size=pool_size)
    sampler = asyncio.create_task(_sample(report, database, stop))
    try:
        for n in range(1, workers + 1):
            fleet.start(
                f"w{n}", "stepline-worker", "--workflows", "tests.chaos.workflow", "--worker-id", f"w{n}"
            )
        fleet.start("s1", "stepline-scheduler")
        ids = await _start_all(bounced, instances)
        await _wait_all(settings.database, ids, timeout_s=600)
    finally:
        stop.set()
        try:
            fleet.stop_all()
            await sampler
        finally:  # PgBouncer is stopped by its pid file whatever happened above
            await asyncio.to_thread(pg_pair.pgbouncer_down, bouncer_dir)
            shutil.rmtree(bouncer_dir, ignore_errors=True)
    await _check(report, settings.database, ids)
    for name in fleet.processes:
        report.errors_in_logs += [
            line for line in fleet.log(name).splitlines() if any(words in line for words in BOUNCER_ERRORS)
        ]
    report.duration_s = time.monotonic() - began
    return report


def _bouncer_folder() -> Path:
    folder = Path(tempfile.mkdtemp(prefix="stepline-pgbouncer-"))
    folder.chmod(0o755)  # PgBouncer runs as postgres
    return folder


async def _start_all(settings: Settings, instances: int) -> list[str]:
    prefix = f"bouncer-{uuid.uuid4().hex[:6]}"
    ids = [f"{prefix}-{n}" for n in range(instances)]
    async with Producer.from_settings(settings) as producer:
        deadline = time.monotonic() + 120
        while await producer.workflow_queue("chaos") is None:  # until a worker registered it
            if time.monotonic() > deadline:
                raise UnregisteredWorkflowError("chaos", settings.namespace)
            await asyncio.sleep(0.2)
        async with Client(
            settings.database,
            settings.amqp,
            namespace=settings.namespace,
            database=settings.db,
            broker=settings.broker,
        ) as c:
            for n, instance_id in enumerate(ids):
                await producer.start("chaos", {"n": n}, instance_id=instance_id)
                # An event sent before the instance waits is kept for it.
                await _send_when_started(c, instance_id, n)
    return ids


async def _send_when_started(client: Client, instance_id: str, n: int) -> None:
    from stepline.shared.errors import InstanceNotFoundError

    while True:
        try:
            await client.send_event(instance_id, "go", {"n": n}, event_id=f"go-{instance_id}")
            return
        except InstanceNotFoundError:
            await asyncio.sleep(0.1)


async def _wait_all(url: str, ids: list[str], *, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(psycopg.OperationalError):  # a full server: ask again
            finished = await db.scalar(
                url, "SELECT count(*) FROM instances WHERE id = ANY(%s) AND finished_at IS NOT NULL", ids
            )
            if finished == len(ids):
                return
        await asyncio.sleep(0.5)


async def _check(report: FleetReport, url: str, ids: list[str]) -> None:
    rows = await db.rows(url, "SELECT id, status, params, output FROM instances WHERE id = ANY(%s)", ids)
    for row in rows:
        if row["status"] == "complete":
            report.completed += 1
            if row["output"] != expected_output(row["params"]["n"]):
                report.wrong_output += 1
    committed = int(
        await db.scalar(
            url,
            "SELECT count(*) FROM steps"
            " WHERE kind = 'step' AND status = 'succeeded' AND instance_id = ANY(%s)",
            ids,
        )
    )
    report.duplicated_commits = abs(committed - report.completed * len(STEPS_PER_INSTANCE))
    report.duplicated_commits += int(
        await db.scalar(
            url,
            "SELECT count(*) FROM (SELECT instance_id, name, occurrence FROM step_attempts"
            " WHERE outcome = 'succeeded' AND instance_id = ANY(%s) GROUP BY 1, 2, 3 HAVING count(*) > 1)"
            " AS doubled",
            ids,
        )
    )


def main() -> int:
    """The long form: 12 workers with concurrency 16 through PgBouncer, on the tests' own PostgreSQL pair."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workers", type=int, default=12)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--instances", type=int, default=300)
    parser.add_argument("--pool-size", type=int, default=20)
    args = parser.parse_args()
    run = uuid.uuid4().hex[:8]
    database, vhost = f"sl_bouncer_{run}", f"stepline-bouncer-{run}"
    log_dir = Path(tempfile.mkdtemp(prefix="stepline-bouncer-fleet-"))
    print(f"pgbouncer fleet: {args.workers} workers x {args.concurrency}, logs in {log_dir}", flush=True)
    with pg_pair.exclusive(), pg_pair.exclusive("pgbouncer"):
        pg_pair.pair_up()
        services.create_vhost(vhost)
        try:
            url = pg_pair.pair_url(database)
            pg_pair.create_database(pg_pair.direct_url("postgres"), database, url)
            os.environ["STEPLINE_DATABASE_URL"] = url
            settings = Settings(
                database_url=url,
                amqp_url=services.amqp_url(vhost),
                namespace=f"pb{run}",
                broker={"queue_type": services.SINGLE_NODE_QUEUE_TYPE},  # the shared single node
            )
            report = asyncio.run(
                run_fleet(
                    settings,
                    log_dir,
                    upstream_port=pg_pair.PRIMARY_PORT,
                    database=database,
                    workers=args.workers,
                    concurrency=args.concurrency,
                    instances=args.instances,
                    pool_size=args.pool_size,
                )
            )
        finally:
            services.delete_vhost(vhost)
            pg_pair.pair_down()
    print(report.render())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
