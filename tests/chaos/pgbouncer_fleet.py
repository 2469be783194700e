"""A fleet of worker and scheduler processes through PgBouncer in transaction pooling mode.

Each process keeps within its connection budget, counted by application_name on
both sides of PgBouncer (its client connections in ``SHOW CLIENTS``, the server
connections it is using in PostgreSQL's ``pg_stat_activity``), while PgBouncer
holds at most its pool of server connections. Short form:
``tests/e2e/test_pgbouncer.py``; long forms (12 workers with concurrency 16):
``python -m tests.chaos.pgbouncer_fleet`` runs the chaos workflow (``make
chaos-failover``), ``--workload throughput`` the benchmark's 10-step workflow
(``make chaos-pgbouncer``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from pydantic import SecretStr

from benchmarks.workflows import TEN, Job, expected_count
from stepline import Client, Producer
from stepline.shared.errors import UnregisteredWorkflowError
from stepline.shared.settings import (
    CLIENT_CONNECTIONS,
    SCHEDULER_CONNECTIONS,
    WORKER_SPARE_CONNECTIONS,
    DatabaseSettings,
    Settings,
)
from tests.chaos.workflow import STEPS_PER_INSTANCE, expected_output
from tests.support import db, pg_pair, services
from tests.support.fleet import ProcessFleet, process_env

HARNESS = "pgbouncer-fleet-harness"
"""The application_name of this harness's own direct connections, which are not PgBouncer's."""
KINDS = ("stepline-worker", "stepline-scheduler", "stepline-client")
"""The processes whose connections are counted, by the start of their application_name."""


@dataclass
class FleetReport:
    """What the fleet did, and the most connections each process held at once on either side of PgBouncer."""

    workers: int
    concurrency: int
    budget: int
    instances: int
    completed: int = 0
    wrong_output: int = 0
    duplicated_commits: int = 0
    most_server_connections: int = 0
    pool_size: int = 0
    duration_s: float = 0.0
    errors_in_logs: list[str] = field(default_factory=list)
    workload: str = "chaos"
    scheduler_budget: int = SCHEDULER_CONNECTIONS
    client_budget: int = CLIENT_CONNECTIONS
    clients_per_process: dict[str, int] = field(default_factory=dict)
    """The most client connections each process had open to PgBouncer at once (``SHOW CLIENTS``)."""
    in_use_per_process: dict[str, int] = field(default_factory=dict)
    """The most server connections each process was using at once (``pg_stat_activity``, not idle)."""
    most_backends: int = 0
    """The most connections PostgreSQL had to the database from PgBouncer (``pg_stat_activity``)."""
    samples: int = 0
    steps: int = 0
    work_s: float = 0.0
    """From the first start to the last instance finished."""
    too_many_clients: list[str] = field(default_factory=list)
    timed_out: bool = False
    most_waiting: int = 0
    """The most clients waiting at once in PgBouncer's queue for a server connection (``cl_waiting``)."""
    longest_wait_s: float = 0.0
    """The longest such wait PgBouncer saw (``maxwait``)."""
    budget_waits: int = 0
    """Lines in which a process said it waited for a connection of its own budget (``db_pool_wait``)."""

    def budget_of(self, process: str) -> int:
        """The connection budget of a process, by its application_name."""
        if process.startswith("stepline-worker"):
            return self.budget
        if process.startswith("stepline-scheduler"):
            return self.scheduler_budget
        return self.client_budget

    def _most(self, counts: dict[str, int], kind: str) -> int:
        return max((n for name, n in counts.items() if name.startswith(kind)), default=0)

    @property
    def most_clients_per_worker(self) -> int:
        return self._most(self.clients_per_process, "stepline-worker")

    @property
    def most_clients_per_scheduler(self) -> int:
        return self._most(self.clients_per_process, "stepline-scheduler")

    @property
    def over_budget(self) -> list[str]:
        """The processes that held more connections than their budget, on either side."""
        return sorted(
            name
            for counts in (self.clients_per_process, self.in_use_per_process)
            for name, n in counts.items()
            if n > self.budget_of(name)
        )

    @property
    def steps_per_s(self) -> float:
        return self.steps / self.work_s if self.work_s else 0.0

    @property
    def ok(self) -> bool:
        return (
            self.completed == self.instances
            and self.wrong_output == self.duplicated_commits == 0
            and self.samples > 0
            and not self.over_budget
            and self.most_server_connections <= self.pool_size
            and self.most_backends <= self.pool_size
            and not self.errors_in_logs
            and not self.too_many_clients
        )

    def render(self) -> str:
        return "\n".join(
            [
                f"pgbouncer fleet summary (transaction pooling, {self.workload} workload)",
                f"  fleet                {self.workers} workers x {self.concurrency} steps, 1 scheduler",
                f"  instances            {self.instances} ({self.completed} complete"
                f"{', deadline passed' if self.timed_out else ''})",
                f"  steps                {self.steps} in {self.work_s:.0f}s: {self.steps_per_s:.1f} steps/s",
                f"  wrong output         {self.wrong_output}",
                f"  duplicated commits   {self.duplicated_commits}",
                f"  most connections     {self.most_clients_per_worker} per worker (budget {self.budget}), "
                f"{self.most_clients_per_scheduler} per scheduler (budget {self.scheduler_budget})",
                f"  server connections   {self.most_server_connections} in SHOW POOLS, "
                f"{self.most_backends} in pg_stat_activity (PgBouncer pool {self.pool_size})",
                f"  PgBouncer's queue    {self.most_waiting} clients waiting at most, "
                f"longest wait {self.longest_wait_s:.2f}s",
                f"  own-budget waits     {self.budget_waits} line(s) (event=db_pool_wait)",
                *self._per_process(),
                f"  over budget          {', '.join(self.over_budget) or 'none'} ({self.samples} samples)",
                f"  too many clients     {len(self.too_many_clients)} line(s) in the logs",
                f"  prepared-statement errors in logs  {len(self.errors_in_logs)}",
                f"  duration             {self.duration_s:.0f}s",
                f"  verdict              {'PASS' if self.ok else 'FAIL'}",
            ]
        )

    def _per_process(self) -> list[str]:
        names = sorted(set(self.clients_per_process) | set(self.in_use_per_process), key=_natural)
        return ["  per process          budget  PgBouncer clients  PostgreSQL in use"] + [
            f"    {name:<30} {self.budget_of(name):>4}  {self.clients_per_process.get(name, 0):>17}"
            f"  {self.in_use_per_process.get(name, 0):>17}"
            for name in names
        ]


def _natural(name: str) -> list[Any]:
    """``w2`` before ``w10``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


BOUNCER_ERRORS = ("prepared statement", "DuplicatePreparedStatement", "InvalidSqlStatementName")
"""What a process logs when it uses server-side prepared statements through transaction pooling."""
TOO_MANY_CLIENTS = ("too many clients", "too many connections", "no more connections allowed")
"""What PostgreSQL (through a process or PgBouncer) and PgBouncer say when connections run out."""


@dataclass(frozen=True)
class Workload:
    """What the fleet runs: the module its workers load, how instances start, what each must return."""

    name: str
    module: str
    workflow: str
    steps_per_instance: int
    start: Callable[[Settings, Producer, list[str]], Awaitable[None]]
    expected: Callable[[int], dict[str, Any]]
    """The output of the instance started with ``n``."""


async def _start_chaos(settings: Settings, producer: Producer, ids: list[str]) -> None:
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


async def _start_throughput(settings: Settings, producer: Producer, ids: list[str]) -> None:
    """All started at once, as the benchmark's throughput run does (a thousand confirms at a time)."""
    chunk = 1000
    for first in range(0, len(ids), chunk):
        batch = ids[first : first + chunk]
        await producer.start_batch(
            "bench-ten", [Job(n=first + i) for i in range(len(batch))], instance_ids=batch
        )


CHAOS = Workload(
    "chaos", "tests.chaos.workflow", "chaos", len(STEPS_PER_INSTANCE), _start_chaos, expected_output
)
THROUGHPUT = Workload(
    "throughput",
    "benchmarks.workflows",
    "bench-ten",
    TEN,
    _start_throughput,
    lambda n: expected_count(n, TEN),
)
"""The benchmark's throughput workload: 10 trivial steps in a row per instance."""
WORKLOADS = {workload.name: workload for workload in (CHAOS, THROUGHPUT)}


async def _admin_rows(query: str) -> list[dict[str, object]]:
    url = pg_pair.direct_url("pgbouncer", pg_pair.PGBOUNCER_PORT)
    async with await psycopg.AsyncConnection.connect(url, autocommit=True, prepare_threshold=None) as conn:
        cursor = await conn.execute(query, prepare=False)
        names = [column.name for column in cursor.description or []]
        return [dict(zip(names, row, strict=True)) for row in await cursor.fetchall()]


def _peak(peaks: dict[str, int], counts: dict[str, int]) -> None:
    for name, n in counts.items():
        if name.startswith(KINDS):
            peaks[name] = max(peaks.get(name, 0), n)


async def _sample_bouncer(report: FleetReport, database: str) -> None:
    """Each process's client connections, and the server connections of the database's pool."""
    clients: dict[str, int] = {}
    for row in await _admin_rows("SHOW CLIENTS"):
        clients[str(row["application_name"])] = clients.get(str(row["application_name"]), 0) + 1
    _peak(report.clients_per_process, clients)
    pools = [row for row in await _admin_rows("SHOW POOLS") if row["database"] == database]
    servers = sum(
        int(str(row[column]))
        for row in pools
        for column in ("sv_active", "sv_idle", "sv_used", "sv_tested", "sv_login")
    )
    report.most_server_connections = max(report.most_server_connections, servers)
    report.most_waiting = max([report.most_waiting, *(int(str(row["cl_waiting"])) for row in pools)])
    report.longest_wait_s = max(
        [
            report.longest_wait_s,
            *(int(str(row["maxwait"])) + int(str(row["maxwait_us"])) / 1e6 for row in pools),
        ]
    )


async def _sample_postgres(report: FleetReport, upstream_admin: str, database: str) -> None:
    """PostgreSQL's side: its connections to the database (all PgBouncer's), and who is using them.

    PgBouncer sets the client's application_name on the server connection it
    lends, and an idle server connection keeps the name of its last client, so
    only a connection in use (not ``idle``) is counted against a process.
    """
    rows = await db.rows(
        upstream_admin,
        "SELECT application_name AS name, count(*) AS open, count(*) FILTER (WHERE state <> 'idle') AS in_use"
        " FROM pg_stat_activity WHERE datname = %s AND backend_type = 'client backend'"
        " AND application_name <> %s GROUP BY 1",
        database,
        HARNESS,
    )
    _peak(report.in_use_per_process, {str(row["name"]): int(row["in_use"]) for row in rows})
    report.most_backends = max(report.most_backends, sum(int(row["open"]) for row in rows))


async def _sample(report: FleetReport, upstream_admin: str, database: str, stop: asyncio.Event) -> None:
    """Count connections on both sides of PgBouncer, until ``stop``."""
    while not stop.is_set():
        with contextlib.suppress(psycopg.Error):
            await _sample_bouncer(report, database)
            await _sample_postgres(report, upstream_admin, database)
            report.samples += 1
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.2)


def _named(url: str, application_name: str) -> str:
    """``url`` with an application_name (the URL may name several hosts, so it is not parsed)."""
    return f"{url}{'&' if '?' in url else '?'}application_name={application_name}"


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
    workload: Workload = CHAOS,
    deadline_s: float = 600,
) -> FleetReport:
    """Run ``instances`` of ``workload`` on ``workers`` worker processes and a scheduler through PgBouncer.

    ``settings`` name the database directly (on ``upstream_port``); the fleet
    reaches it through PgBouncer, with ``STEPLINE_DATABASE__PGBOUNCER=true``.
    The work must be done within ``deadline_s`` of the first start; then every
    process is stopped by its pid, whatever happened.
    """
    report = FleetReport(
        workers,
        concurrency,
        budget or concurrency + WORKER_SPARE_CONNECTIONS,
        instances,
        pool_size=pool_size,
        workload=workload.name,
        scheduler_budget=budget or SCHEDULER_CONNECTIONS,
    )
    bouncer_dir = _bouncer_folder()
    via_bouncer = pg_pair.direct_url(database, pg_pair.PGBOUNCER_PORT)
    bounced = settings.model_copy(
        update={"database_url": SecretStr(via_bouncer), "db": DatabaseSettings(pgbouncer=True)}
    )
    harness_url = _named(settings.database, HARNESS)
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
    upstream_admin = _named(pg_pair.direct_url("postgres", upstream_port), HARNESS)
    sampler = asyncio.create_task(_sample(report, upstream_admin, database, stop))
    ids = [f"bouncer-{uuid.uuid4().hex[:6]}-{n}" for n in range(instances)]
    try:
        for n in range(1, workers + 1):
            fleet.start(f"w{n}", "stepline-worker", "--workflows", workload.module, "--worker-id", f"w{n}")
        fleet.start("s1", "stepline-scheduler")
        await _until_registered(bounced, workload.workflow)
        work_began = time.monotonic()
        try:
            async with asyncio.timeout(deadline_s):
                await _start_all(bounced, workload, ids)
                await _wait_all(harness_url, ids, timeout_s=deadline_s)
        except TimeoutError:
            report.timed_out = True
        report.work_s = time.monotonic() - work_began
    finally:
        stop.set()
        try:
            fleet.stop_all()
            await sampler
        finally:  # PgBouncer is stopped by its pid file whatever happened above
            report.too_many_clients += _lines(bouncer_dir / "pgbouncer.log", TOO_MANY_CLIENTS)
            await asyncio.to_thread(pg_pair.pgbouncer_down, bouncer_dir)
            shutil.rmtree(bouncer_dir, ignore_errors=True)
    await _check(report, harness_url, ids, workload)
    for name in fleet.processes:
        report.errors_in_logs += _lines(log_dir / f"{name}.log", BOUNCER_ERRORS)
        report.too_many_clients += _lines(log_dir / f"{name}.log", TOO_MANY_CLIENTS)
        report.budget_waits += len(_lines(log_dir / f"{name}.log", ("event=db_pool_wait",)))
    report.duration_s = time.monotonic() - began
    return report


def _lines(log: Path, words: tuple[str, ...]) -> list[str]:
    """The lines of a log file that contain any of ``words``."""
    if not log.exists():
        return []
    return [line for line in log.read_text(errors="replace").splitlines() if any(w in line for w in words)]


def _bouncer_folder() -> Path:
    folder = Path(tempfile.mkdtemp(prefix="stepline-pgbouncer-"))
    folder.chmod(0o755)  # PgBouncer runs as postgres
    return folder


async def _until_registered(settings: Settings, workflow: str) -> None:
    async with Producer.from_settings(settings) as producer:
        deadline = time.monotonic() + 120
        while await producer.workflow_queue(workflow) is None:  # until a worker registered it
            if time.monotonic() > deadline:
                raise UnregisteredWorkflowError(workflow, settings.namespace)
            await asyncio.sleep(0.2)


async def _start_all(settings: Settings, workload: Workload, ids: list[str]) -> None:
    async with Producer.from_settings(settings) as producer:
        await workload.start(settings, producer, ids)


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


async def _check(report: FleetReport, url: str, ids: list[str], workload: Workload) -> None:
    rows = await db.rows(url, "SELECT id, status, params, output FROM instances WHERE id = ANY(%s)", ids)
    for row in rows:
        if row["status"] == "complete":
            report.completed += 1
            if row["output"] != workload.expected(row["params"]["n"]):
                report.wrong_output += 1
    committed = int(
        await db.scalar(
            url,
            "SELECT count(*) FROM steps"
            " WHERE kind = 'step' AND status = 'succeeded' AND instance_id = ANY(%s)",
            ids,
        )
    )
    report.steps = committed
    report.duplicated_commits = abs(committed - report.completed * workload.steps_per_instance)
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
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default=CHAOS.name)
    parser.add_argument("--deadline", type=float, default=600, help="seconds the work may take (default 600)")
    args = parser.parse_args()
    run = uuid.uuid4().hex[:8]
    database, vhost = f"sl_bouncer_{run}", f"stepline-bouncer-{run}"
    log_dir = Path(tempfile.mkdtemp(prefix="stepline-bouncer-fleet-"))
    print(
        f"pgbouncer fleet: {args.workers} workers x {args.concurrency}, {args.instances} {args.workload}"
        f" instances, logs in {log_dir}",
        flush=True,
    )
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
                    workload=WORKLOADS[args.workload],
                    deadline_s=args.deadline,
                )
            )
        finally:
            services.delete_vhost(vhost)
            pg_pair.pair_down()
    print(report.render())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
