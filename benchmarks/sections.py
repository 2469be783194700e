"""The benchmark's sections: each starts its processes, drives load, and reads the outcome by SQL."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import math
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
from psycopg.rows import DictRow, dict_row
from pydantic import BaseModel
from rich.console import Console
from rich.progress import Progress, TaskID

from benchmarks import naive
from benchmarks.backlog import make_due
from benchmarks.isolation import Isolation, purge_queues
from benchmarks.procs import (
    BIN,
    NAIVE_READY,
    SCHEDULER_READY,
    WORKER_READY,
    Fleet,
    Proc,
    broker_pids,
    cpu_seconds,
    machine_busy_seconds,
    rss_kib,
)
from benchmarks.stats import summary_ms
from benchmarks.workflows import (
    TEN,
    Alarm,
    Chain,
    Job,
    bench_chain,
    bench_nap,
    bench_sleep,
    bench_ten,
    expected_count,
)
from stepline import Producer
from stepline.worker.workflow import Workflow

ENGINE_TABLES = "instances, steps, step_attempts, outbox, timers, events"
DUE_AHEAD_S = 2.0
"""How far ahead the timers section makes its armed sleeps due."""
STATS_IDLE_S = 10.5
"""How long an idle backend may keep its statistics before it reports them: PostgreSQL's
``PGSTAT_IDLE_INTERVAL`` (10 s) when it reported less than a second before going idle."""
REPLAY_STEPS = 20
"""Steps in each history the replay-check section checks."""
STALL_TIMEOUT_S = 90.0
"""A run that makes no progress for this long is stopped and reported as incomplete."""
NAIVE_CONCURRENCY = 16
NAIVE_PREFETCH = 32
"""The naive loop gets what a worker gets by default: 16 steps at once, prefetch 2 x 16."""


@dataclass(frozen=True)
class Sizes:
    """How much work each section does."""

    instances: int
    """Instances of the 10-step workflow per throughput run (and per naive run)."""
    worker_counts: tuple[int, ...]
    latency_s: float
    """Seconds of open-loop arrivals in the latency section."""
    timers: int
    """Sleeps due in the same instant."""
    resume_timers: int
    """Sleeps due in the same instant in the resume run (issue 23: 1,000)."""
    backlog_sleepers: int
    """Sleeping instances woken while a backlog of starts waits (the backlog section)."""
    backlog_starts: int
    """Starts queued ahead of the wakes in the backlog section."""
    held_instances: int
    """Instances held sleeping, and as many held waiting for an event, in the held section."""
    held_started: int
    """Of those, how many of each kind are started through the engine; the rest are copies of their rows."""
    held_spread_s: float
    """The held section's sleeps fall due evenly over this many seconds."""
    long_steps: int
    long_instances: int
    """1,000-step instances run at once in the long-workflow section (and 10-step ones kept in flight)."""
    short_steps: int
    long_chain_steps: int
    """Steps of the one long chain timed per 1,000-step window, and SIGKILLed half-way (issue 23)."""
    rawtx_s: float
    rawtx_clients: int
    replay_instances: int
    """Unfinished instances ``stepline replay-check`` replays (of a 20-step history each)."""
    bigdb_instances: int
    """Finished instances (10 steps each) in the big-database section's own database."""
    bigdb_samples: int
    """Times each read is timed in the big-database section."""
    fanout_width: int
    """Parallel steps the one wide instance of the fan-out section gathers."""
    fanout_instances: int
    fanout_branches: int
    """Instances, and parallel steps each, of the fan-out section's second part."""
    starts_s: float
    """Seconds the starts section publishes starts for (issue 23: sustained 30 s)."""
    starts_batch: int
    """Starts in the starts section's one ``start_batch`` call (issue 23: 10,000)."""


QUICK = Sizes(
    instances=120,
    worker_counts=(1, 2, 4),
    latency_s=12,
    timers=1_000,
    resume_timers=1_000,
    backlog_sleepers=200,
    backlog_starts=4_000,
    held_instances=5_000,
    held_started=2_000,
    held_spread_s=30.0,
    long_steps=1_000,
    long_instances=1,
    short_steps=10,
    long_chain_steps=2_000,
    rawtx_s=5,
    rawtx_clients=8,
    replay_instances=2_000,
    bigdb_instances=100_000,
    bigdb_samples=30,
    fanout_width=300,
    fanout_instances=30,
    fanout_branches=100,
    starts_s=10,
    starts_batch=10_000,
)
FULL = Sizes(
    instances=600,
    worker_counts=(1, 2, 4),
    latency_s=60,
    timers=10_000,
    resume_timers=1_000,
    backlog_sleepers=1_000,
    backlog_starts=20_000,
    held_instances=100_000,
    held_started=5_000,
    held_spread_s=300.0,
    long_steps=1_000,
    long_instances=2,
    short_steps=10,
    long_chain_steps=10_000,
    rawtx_s=10,
    rawtx_clients=8,
    replay_instances=10_000,
    bigdb_instances=1_000_000,
    bigdb_samples=100,
    fanout_width=1_000,
    fanout_instances=100,
    fanout_branches=100,
    starts_s=30,
    starts_batch=10_000,
)


@dataclass
class Check:
    """What the correctness check found for one run."""

    expected: int = 0
    complete: int = 0
    missing: int = 0
    wrong_status: dict[str, int] = field(default_factory=dict)
    wrong_output: int = 0
    examples: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.complete == self.expected and self.missing == 0 and self.wrong_output == 0

    def describe(self) -> str:
        if self.ok:
            return f"all {self.expected} complete, right output"
        parts = [f"{self.complete}/{self.expected} complete"]
        if self.missing:
            parts.append(f"{self.missing} never created")
        parts.extend(f"{count} {status}" for status, count in sorted(self.wrong_status.items()))
        if self.wrong_output:
            parts.append(f"{self.wrong_output} wrong output")
        if self.examples:
            parts.append("e.g. " + ", ".join(self.examples[:5]))
        return "; ".join(parts)


@dataclass
class EngineRun:
    """One run of the engine over a batch of instances."""

    label: str
    workflow: str
    workers: int
    instances: int
    steps_per_instance: int
    in_flight: int | None
    elapsed_s: float = math.nan
    steps: int = 0
    steps_per_s: float = math.nan
    workflows_per_s: float = math.nan
    worker_cpu_ms_per_step: float = math.nan
    db_per_step: dict[str, float] = field(default_factory=dict)
    """Transactions and rows per step, from ``pg_stat_database``."""
    machine_cpu_ms_per_step: float = math.nan
    rss_start_kib: list[int] = field(default_factory=list)
    rss_end_kib: list[int] = field(default_factory=list)
    check: Check = field(default_factory=Check)

    @property
    def rss_growth_pct(self) -> float:
        growths = [
            100.0 * (end - start) / start
            for start, end in zip(self.rss_start_kib, self.rss_end_kib, strict=True)
            if start
        ]
        return max(growths) if growths else math.nan

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["rss_growth_pct"] = self.rss_growth_pct
        data["check"]["ok"] = self.check.ok
        return data


@dataclass
class NaiveRun:
    """One run of the naive step loop."""

    processes: int
    instances: int
    steps_per_instance: int
    elapsed_s: float = math.nan
    steps: int = 0
    steps_per_s: float = math.nan
    complete: int = 0
    machine_cpu_ms_per_step: float = math.nan
    db_per_step: dict[str, float] = field(default_factory=dict)


DB_COUNTERS = ("xact_commit", "xact_rollback", "tup_inserted", "tup_updated", "tup_deleted", "tup_fetched")


def per_step(before: dict[str, int], after: dict[str, int], steps: int) -> dict[str, float]:
    """PostgreSQL's own counters for this database, per step (includes the driver's few polls)."""
    if not steps or not before or not after:
        return {}
    return {name: (after[name] - before[name]) / steps for name in DB_COUNTERS}


@dataclass(frozen=True)
class Usage:
    """Where a window of a run spent its time: CPU seconds by process group, and PostgreSQL's
    statement time (``pg_stat_database.active_time``: its backends executing, for this database)."""

    workers_s: float
    schedulers_s: float
    broker_s: float
    broker_pids: tuple[int, ...]
    database_s: float

    def per(self, before: Usage, count: int) -> dict[str, float]:
        """Milliseconds of each per unit of work since ``before`` (``workers_ms`` ...); the broker's is
        NaN if its nodes changed meanwhile (one restarted: its CPU time started again)."""
        per = {
            name.replace("_s", "_ms"): 1000.0 * (getattr(self, name) - getattr(before, name)) / max(count, 1)
            for name in ("workers_s", "schedulers_s", "broker_s", "database_s")
        }
        if self.broker_pids != before.broker_pids:
            per["broker_ms"] = math.nan
        return per


class Bench:
    """Runs the sections on one isolated database and vhost, collecting results as plain data."""

    def __init__(
        self, iso: Isolation, sizes: Sizes, fleet: Fleet, console: Console, progress: Progress
    ) -> None:
        self.iso = iso
        self.sizes = sizes
        self.fleet = fleet
        self.console = console
        self.progress = progress
        self.results: dict[str, Any] = {}
        self.throughput: dict[int, EngineRun] = {}
        self.naive: dict[int, NaiveRun] = {}
        self.problems: list[str] = []
        # Messages a run left in the queues (each a duplicate: every instance had finished), by run.
        self.left_in_queues: dict[str, int] = {}
        self.keep_bigdb = False
        """Keep the big-database section's database at the end (``--keep-bigdb``)."""
        self.empties_tables = True
        """``reset`` empties the tables; not on a database whose rows are the point (the big one)."""
        self.code_point_ids = False
        """Ids sort by code point here, so a prefix is one range of an index (``prefixed``)."""
        self._last_run = ""

    # ------------------------------------------------------------ database helpers

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[psycopg.AsyncConnection[DictRow]]:
        conn = await psycopg.AsyncConnection.connect(
            self.iso.database_url, autocommit=True, row_factory=dict_row
        )
        try:
            yield conn
        finally:
            await conn.close()

    async def rows(self, sql: str, *params: Any) -> list[dict[str, Any]]:
        async with self.connection() as conn:
            cursor = await conn.execute(sql, params)
            return list(await cursor.fetchall()) if cursor.description else []

    async def scalar(self, sql: str, *params: Any) -> Any:
        found = await self.rows(sql, *params)
        return next(iter(found[0].values())) if found else None

    async def db_stats(self) -> dict[str, int]:
        """This database's counters; backends that just exited get half a second to report theirs."""
        await asyncio.sleep(0.5)
        row = (
            await self.rows(
                f"SELECT {', '.join(DB_COUNTERS)} FROM pg_stat_database WHERE datname = current_database()"
            )
        )[0]
        return {name: int(row[name]) for name in DB_COUNTERS}

    async def usage(self, workers: Sequence[Proc], schedulers: Sequence[Proc]) -> Usage:
        """CPU used so far by these processes and the broker nodes, and the database's statement time.

        A backend reports its statement time some time after its work (about a second once
        idle) and when it exits: ``database_active_s`` again once the processes stopped.
        """
        brokers = tuple(broker_pids())
        return Usage(
            workers_s=sum(cpu_seconds(proc.pid) for proc in workers),
            schedulers_s=sum(cpu_seconds(proc.pid) for proc in schedulers),
            broker_s=sum(cpu_seconds(pid) for pid in brokers),
            broker_pids=brokers,
            database_s=await self.database_active_s(),
        )

    async def database_active_s(self) -> float:
        """Seconds this database's backends have spent executing statements (as reported so far)."""
        active_ms = await self.scalar(
            "SELECT active_time FROM pg_stat_database WHERE datname = current_database()"
        )
        return float(active_ms or 0.0) / 1000.0

    async def setup(self) -> None:
        async with self.connection() as conn:
            await conn.execute(naive.DDL)

    def on_database(self, database_url: str) -> Bench:
        """This bench on another database (the big one): its workers use it, ``reset`` keeps its rows.

        The workers join this run's fleet, so that stopping it stops them too.
        """
        iso = dataclasses.replace(self.iso, database_url=database_url)
        fleet = dataclasses.replace(
            self.fleet, env={**self.fleet.env, "STEPLINE_DATABASE_URL": database_url}, procs=self.fleet.procs
        )
        other = Bench(iso, self.sizes, fleet, self.console, self.progress)
        other.problems = self.problems
        other.empties_tables = False
        return other

    async def read_collation(self) -> None:
        """Whether ids sort by code point in this database (``code_point_ids``)."""
        self.code_point_ids = await ids_sort_by_code_point(self.iso.database_url)

    def prefixed(self, column: str, prefix: str) -> tuple[str, tuple[str, ...]]:
        """A condition on ``column`` starting with ``prefix``, and its parameters.

        ``LIKE`` uses no index unless the collation is "C": on the big database each
        poll would read every row. Where ids sort by code point the prefix is also
        given as a range, which the primary key serves.
        """
        if not self.code_point_ids:
            return f"{column} LIKE %s", (prefix + "%",)
        return f"{column} >= %s AND {column} < %s AND {column} LIKE %s", (
            prefix,
            prefix[:-1] + chr(ord(prefix[-1]) + 1),
            prefix + "%",
        )

    async def reset(self, run: str) -> None:
        """Empty every table and workflow queue before ``run`` (no process is running then).

        ``TRUNCATE`` leaves the tables as a new deployment's are: empty, with no
        statistics (``reltuples`` -1), so the planner assumes some pages and
        uses the indexes. The ``ANALYZE`` this once ran after it recorded them
        as empty: every cached (generic) plan the fresh workers and the naive
        loop then made was a sequential scan, which cost more with each row the
        run added (PostgreSQL's CPU per step doubled within the 60 s latency run,
        and its p99 grew threefold). On a live database autovacuum analyzes the
        tables as they grow, which invalidates such plans within about a minute.
        """
        await self.purge_queues()
        if not self.empties_tables:
            self._last_run = run
            return
        async with self.connection() as conn:
            await conn.execute(f"TRUNCATE {ENGINE_TABLES} CASCADE")
            await conn.execute(naive.TRUNCATE)
        self._last_run = run

    async def purge_queues(self) -> None:
        """Empty the workflows' queues; count what the last run left there, as a figure of that run.

        Runs must not see each other: a message the last run left in a queue (a
        wake-up or step published twice, which the workers would have dropped)
        would cost the next run's workers a history read and a lock each.
        """
        names = [
            bench_ten.name,
            bench_chain.name,
            bench_sleep.name,
            bench_nap.name,
            "bench-ten-limited",
            "bench-hold",
            "bench-fanout",
            "bench-await",
        ]
        left = await purge_queues(self.iso.amqp_url, names)
        if self._last_run:
            self.left_in_queues[self._last_run] = left
            if left:
                self.note(f"{self._last_run}: {left} duplicate messages left in the queues (purged)")
        self._last_run = ""

    def note(self, text: str) -> None:
        self.progress.console.print(text)

    def problem(self, text: str) -> None:
        self.problems.append(text)
        self.progress.console.print(f"[bold red]problem:[/] {text}")

    # ------------------------------------------------------------ processes

    async def start_workers(self, label: str, count: int) -> list[Proc]:
        procs = [self.fleet.worker(f"{label}-w{n + 1}") for n in range(count)]
        await self.fleet.wait_ready(procs, WORKER_READY)
        return procs

    async def start_noting_schedulers(self, label: str, count: int) -> tuple[list[Proc], list[Path]]:
        """Schedulers that note when each timer fired; the files they write on a clean stop."""
        started = [self.fleet.noting_scheduler(f"{label}-s{n + 1}") for n in range(count)]
        procs = [proc for proc, _ in started]
        await self.fleet.wait_ready(procs, SCHEDULER_READY)
        return procs, [notes for _, notes in started]

    def check_alive(self, procs: Sequence[Proc]) -> None:
        for proc in procs:
            if proc.popen.poll() is not None:
                raise RuntimeError(f"{proc.name} died with {proc.popen.returncode}:\n{proc.tail()}")

    # ------------------------------------------------------------ waiting with progress

    async def wait_finished(
        self,
        prefix: str,
        total: int,
        task: TaskID,
        procs: Sequence[Proc],
        *,
        poll_s: float = 0.2,
        on_progress: Callable[[int], Any] | None = None,
        table: str = "instances",
    ) -> int:
        """Poll until ``total`` instances under ``prefix`` have finished, or progress stalls.

        Progress is finished instances, or (checked every few seconds, as it costs
        more) committed steps, so one long instance is not taken for a stall.
        """
        where, params = self.prefixed("id", prefix)
        sql = f"SELECT count(*) AS n FROM {table} WHERE {where} AND finished_at IS NOT NULL"
        results = "naive_results" if table == "naive_instances" else "step_attempts"
        steps_where, steps_params = self.prefixed("instance_id", prefix)
        steps_sql = f"SELECT count(*) AS n FROM {results} WHERE {steps_where}"
        last: tuple[int, int] = (-1, -1)
        last_change = next_look = time.monotonic()
        async with self.connection() as conn:
            while True:
                cursor = await conn.execute(sql, params)
                row = await cursor.fetchone()
                finished = int(row["n"]) if row else 0
                self.progress.update(task, completed=finished)
                if on_progress is not None:
                    await on_progress(finished)
                if finished >= total:
                    return finished
                now = time.monotonic()
                if now >= next_look:
                    next_look = now + 2.0
                    cursor = await conn.execute(steps_sql, steps_params)
                    row = await cursor.fetchone()
                    seen = (finished, int(row["n"]) if row else 0)
                    if seen != last:
                        last, last_change = seen, now
                    elif now - last_change > STALL_TIMEOUT_S:
                        self.problem(
                            f"{prefix}: no progress for {STALL_TIMEOUT_S:.0f}s at {finished}/{total} finished"
                        )
                        return finished
                    self.check_alive(procs)
                await asyncio.sleep(poll_s)

    # ------------------------------------------------------------ engine runs

    async def check_instances(
        self, prefix: str, ids: Sequence[str], expected: Callable[[int], dict[str, Any]]
    ) -> Check:
        """Every started instance must be complete with the output its params imply."""
        where, params = self.prefixed("id", prefix)
        found = {
            row["id"]: row
            for row in await self.rows(f"SELECT id, status, output FROM instances WHERE {where}", *params)
        }
        check = Check(expected=len(ids))
        for index, instance_id in enumerate(ids):
            row = found.get(instance_id)
            if row is None:
                check.missing += 1
                check.examples.append(f"{instance_id} (missing)")
            elif row["status"] != "complete":
                check.wrong_status[row["status"]] = check.wrong_status.get(row["status"], 0) + 1
                check.examples.append(f"{instance_id} ({row['status']})")
            elif row["output"] != expected(index):
                check.wrong_output += 1
                check.examples.append(f"{instance_id} (output {row['output']!r})")
            else:
                check.complete += 1
        return check

    async def engine_run(
        self,
        *,
        label: str,
        workers: int,
        workflow: Workflow[Any, Any],
        params: Callable[[int], BaseModel],
        expected: Callable[[int], dict[str, Any]],
        count: int,
        steps_per_instance: int,
        in_flight: int | None = None,
        description: str,
    ) -> EngineRun:
        """Start ``count`` instances (all at once, or ``in_flight`` at a time) on fresh workers; measure."""
        await self.reset(description)
        run = EngineRun(label, workflow.name, workers, count, steps_per_instance, in_flight)
        prefix = f"{label}-"
        ids = [f"{prefix}{index:06d}" for index in range(count)]
        procs = await self.start_workers(label, workers)
        task = self.progress.add_task(description, total=count)
        try:
            stats_before = await self.db_stats()
            run.rss_start_kib = [rss_kib(proc.pid) for proc in procs]
            cpu_before = [cpu_seconds(proc.pid) for proc in procs]
            machine_before = machine_busy_seconds()
            async with Producer(self.iso.amqp_url) as producer:
                began = time.time()
                if in_flight is None:
                    await start_all(producer, workflow, [params(i) for i in range(count)], ids)
                    await self.wait_finished(prefix, count, task, procs)
                else:
                    started = 0

                    async def top_up(finished: int) -> None:
                        nonlocal started
                        while started < count and started - finished < in_flight:
                            await producer.start(workflow, params(started), instance_id=ids[started])
                            started += 1

                    await self.wait_finished(prefix, count, task, procs, poll_s=0.005, on_progress=top_up)
            run.rss_end_kib = [rss_kib(proc.pid) for proc in procs]
            worker_cpu = sum(cpu_seconds(proc.pid) for proc in procs) - sum(cpu_before)
            machine_cpu = machine_busy_seconds() - machine_before
        finally:
            self.fleet.stop(procs)
            self.progress.remove_task(task)
        stats_after = await self.db_stats()
        where, matched = self.prefixed("id", prefix)
        row = (
            await self.rows(
                f"SELECT max(finished_at) AS last FROM instances WHERE {where} AND finished_at IS NOT NULL",
                *matched,
            )
        )[0]
        where, matched = self.prefixed("instance_id", prefix)
        run.steps = int(
            await self.scalar(
                f"SELECT count(*) FROM step_attempts WHERE {where} AND outcome = 'succeeded'", *matched
            )
        )
        run.check = await self.check_instances(prefix, ids, expected)
        if row["last"] is not None:
            run.elapsed_s = row["last"].timestamp() - began
            run.steps_per_s = run.steps / run.elapsed_s
            run.workflows_per_s = run.check.complete / run.elapsed_s
        run.db_per_step = per_step(stats_before, stats_after, run.steps)
        if run.steps:
            run.worker_cpu_ms_per_step = 1000.0 * worker_cpu / run.steps
            run.machine_cpu_ms_per_step = 1000.0 * machine_cpu / run.steps
        if not run.check.ok:
            self.problem(f"{description}: {run.check.describe()}")
        return run

    # ------------------------------------------------------------ 1. throughput (and 6. memory)

    async def throughput_run(self, workers: int, label: str | None = None) -> EngineRun:
        count = self.sizes.instances
        run = await self.engine_run(
            label=label or f"tp{workers}",
            workers=workers,
            workflow=bench_ten,
            params=lambda i: Job(n=i),
            expected=lambda i: expected_count(i, TEN),
            count=count,
            steps_per_instance=TEN,
            description=f"throughput, {workers} worker{'s' if workers > 1 else ''}",
        )
        self.note(
            f"throughput {workers} worker(s): {run.steps_per_s:.0f} steps/s, "
            f"{run.workflows_per_s:.1f} workflows/s, RSS growth {run.rss_growth_pct:.1f}%"
        )
        return run

    # ------------------------------------------------------------ 5. references

    async def naive_run(self, processes: int) -> NaiveRun:
        await self.reset(f"naive loop, {processes} process(es)")
        count, steps = self.sizes.instances, TEN
        run = NaiveRun(processes, count, steps)
        queue = f"naive-{processes}"
        prefix = f"nv{processes}-"
        ids = [f"{prefix}{index:06d}" for index in range(count)]
        procs = [
            self.fleet.start(
                f"naive{processes}-p{n + 1}",
                [
                    str(BIN / "python"),
                    "-m",
                    "benchmarks.naive",
                    "--database-url",
                    self.iso.database_url,
                    "--amqp-url",
                    self.iso.amqp_url,
                    "--queue",
                    queue,
                    "--concurrency",
                    str(NAIVE_CONCURRENCY),
                    "--prefetch",
                    str(NAIVE_PREFETCH),
                ],
            )
            for n in range(processes)
        ]
        task = self.progress.add_task(f"naive loop, {processes} process(es)", total=count)
        try:
            await self.fleet.wait_ready(procs, NAIVE_READY)
            await naive.insert_instances(self.iso.database_url, ids, steps)
            stats_before = await self.db_stats()
            machine_before = machine_busy_seconds()
            began = await naive.publish_first(self.iso.amqp_url, queue, ids, steps)
            run.complete = await self.wait_finished(prefix, count, task, procs, table="naive_instances")
            machine_cpu = machine_busy_seconds() - machine_before
        finally:
            self.fleet.stop(procs)
            self.progress.remove_task(task)
        stats_after = await self.db_stats()
        last = await self.scalar(
            "SELECT max(finished_at) FROM naive_instances WHERE id LIKE %s", prefix + "%"
        )
        run.steps = int(
            await self.scalar("SELECT count(*) FROM naive_results WHERE instance_id LIKE %s", prefix + "%")
        )
        if last is not None:
            run.elapsed_s = last.timestamp() - began
            run.steps_per_s = run.steps / run.elapsed_s
        run.db_per_step = per_step(stats_before, stats_after, run.steps)
        if run.steps:
            run.machine_cpu_ms_per_step = 1000.0 * machine_cpu / run.steps
        if run.complete != count:
            self.problem(f"naive loop, {processes} process(es): {run.complete}/{count} instances finished")
        self.note(f"naive loop {processes} process(es): {run.steps_per_s:.0f} steps/s")
        return run

    async def rawtx(self) -> dict[str, Any]:
        await self.reset("raw transaction")
        clients, seconds = self.sizes.rawtx_clients, self.sizes.rawtx_s
        result: dict[str, Any] = {"clients": clients}
        for key, one_statement in (("statements", False), ("one_statement", True)):
            task = self.progress.add_task(f"raw transaction ({key}), {clients} clients", total=None)
            try:
                began = time.monotonic()
                count = await naive.raw_transactions(
                    self.iso.database_url, clients=clients, seconds=seconds, one_statement=one_statement
                )
                elapsed = time.monotonic() - began
            finally:
                self.progress.remove_task(task)
            result[key] = {"seconds": elapsed, "transactions": count, "tx_per_s": count / elapsed}
        result["tx_per_s"] = result["statements"]["tx_per_s"]
        self.note(
            f"raw transaction: {result['tx_per_s']:.0f} tx/s as the naive loop sends it,"
            f" {result['one_statement']['tx_per_s']:.0f} tx/s as one statement ({clients} clients)"
        )
        return result

    # ------------------------------------------------------------ 2. latency

    async def latency(self) -> dict[str, Any]:
        workers = 2
        reference = self.throughput.get(workers)
        if reference is None or not math.isfinite(reference.workflows_per_s):
            self.note("latency: measuring the 2-worker maximum first")
            reference = await self.throughput_run(workers, label="cal")
        rate = 0.5 * reference.workflows_per_s
        total = max(1, int(rate * self.sizes.latency_s))
        await self.reset("latency")
        prefix = "lat-"
        ids = [f"{prefix}{index:06d}" for index in range(total)]
        published: dict[str, float] = {}
        procs = await self.start_workers("lat", workers)
        task = self.progress.add_task(f"latency at {rate:.1f} workflows/s", total=total)
        lag: list[float] = []
        try:
            async with Producer(self.iso.amqp_url) as producer:

                async def publish(index: int) -> None:
                    published[ids[index]] = time.time()
                    await producer.start(bench_ten, Job(n=index), instance_id=ids[index])

                async def arrivals() -> None:
                    sends: list[asyncio.Task[None]] = []
                    origin = time.monotonic()
                    for index in range(total):
                        delay = origin + index / rate - time.monotonic()
                        if delay > 0:
                            await asyncio.sleep(delay)
                        lag.append(max(0.0, -delay))
                        sends.append(asyncio.create_task(publish(index)))
                    await asyncio.gather(*sends)

                sender = asyncio.create_task(arrivals())
                await self.wait_finished(prefix, total, task, procs)
                await sender
        finally:
            self.fleet.stop(procs)
            self.progress.remove_task(task)
        check = await self.check_instances(prefix, ids, lambda i: expected_count(i, TEN))
        if not check.ok:
            self.problem(f"latency: {check.describe()}")
        attempts = await self.rows(
            "SELECT instance_id, occurrence, started_at, finished_at FROM step_attempts"
            " WHERE instance_id LIKE %s AND outcome = 'succeeded' ORDER BY instance_id, occurrence",
            prefix + "%",
        )
        finished = {
            row["id"]: row["finished_at"]
            for row in await self.rows(
                "SELECT id, finished_at FROM instances WHERE id LIKE %s AND finished_at IS NOT NULL",
                prefix + "%",
            )
        }
        first_step: list[float] = []
        next_step: list[float] = []
        previous: dict[str, Any] | None = None
        for row in attempts:
            if previous is None or previous["instance_id"] != row["instance_id"]:
                first_step.append(row["started_at"].timestamp() - published[row["instance_id"]])
            else:
                next_step.append((row["started_at"] - previous["finished_at"]).total_seconds())
            previous = row
        complete = [finished[i].timestamp() - published[i] for i in ids if i in finished]
        result: dict[str, Any] = {
            "workers": workers,
            "rate_workflows_per_s": rate,
            "rate_steps_per_s": rate * TEN,
            "reference_workflows_per_s": reference.workflows_per_s,
            "seconds": self.sizes.latency_s,
            "instances": total,
            "publisher_lag_p99_ms": summary_ms(lag)["p99_ms"],
            "start_to_first_step": summary_ms(first_step),
            "step_to_next_step": summary_ms(next_step),
            "start_to_complete": summary_ms(complete),
            "check": {**asdict(check), "ok": check.ok},
        }
        self.note(
            f"latency at {rate:.1f} workflows/s: step-to-next"
            f" p50 {result['step_to_next_step']['p50_ms']:.1f} ms,"
            f" p99 {result['step_to_next_step']['p99_ms']:.1f} ms"
        )
        return result

    # ------------------------------------------------------------ 3. timers

    async def timers(self) -> dict[str, Any]:
        """The same sleeps twice: due at one instant (the worst case), then evenly within one second.

        Then, unless the first run had that size already, ``resume_timers`` (1,000) due at one instant.
        """
        instant = await self._timers_due("tm-", spread_s=0.0)
        spread = await self._timers_due("ts-", spread_s=1.0)
        result = {**instant, "spread": spread}
        if self.sizes.resume_timers != self.sizes.timers:
            result["resume"] = await self._timers_due("tr-", spread_s=0.0, count=self.sizes.resume_timers)
        return result

    async def _timers_due(self, prefix: str, *, spread_s: float, count: int | None = None) -> dict[str, Any]:
        count = count or self.sizes.timers
        variant = "at one instant" if spread_s == 0 else f"within {spread_s:g}s"
        await self.reset(f"timers due {variant}")
        ids = [f"{prefix}{index:06d}" for index in range(count)]
        workers = await self.start_workers(prefix.rstrip("-"), 2)
        schedulers, notes = await self.start_noting_schedulers(prefix.rstrip("-"), 2)
        procs = workers + schedulers
        published = time.time()
        # Armed a day ahead, then made due together once all are armed: how fast sleeps are
        # armed cannot leak into the lateness, and no guess of that speed is needed.
        far = datetime.now(UTC) + timedelta(days=1)
        alarms = [Alarm(n=i, due=far) for i in range(count)]
        arming = self.progress.add_task(f"timers: arming {count} sleeps", total=count)
        resuming = self.progress.add_task(f"timers: due {variant}, resumed", total=count)
        try:
            async with Producer(self.iso.amqp_url) as producer:
                await start_all(producer, bench_nap, alarms, ids)
            async with self.connection() as conn:
                armed = 0
                last_armed = published
                while armed < count:
                    cursor = await conn.execute(
                        "SELECT count(*) AS n, extract(epoch FROM max(created_at))::float8 AS last"
                        " FROM timers WHERE instance_id LIKE %s",
                        (prefix + "%",),
                    )
                    row = await cursor.fetchone()
                    armed = int(row["n"]) if row else 0
                    last_armed = row["last"] if row and row["last"] is not None else last_armed
                    self.progress.update(arming, completed=armed)
                    self.check_alive(procs)
                    await asyncio.sleep(0.25)
            # Sampled once the arming's statement time is reported (see STATS_IDLE_S) and the
            # moving connection's backend exited (half a second), and as the last resumed; the
            # database's share once more after the workers stopped.
            await asyncio.sleep(STATS_IDLE_S)
            await make_due(self, prefix, count, spread_s)
            await asyncio.sleep(0.5)
            before = await self.usage(workers, schedulers)
            await self.wait_finished(prefix, count, resuming, procs)
            ended = await self.usage(workers, schedulers)
        finally:
            self.fleet.stop(procs)
            self.progress.remove_task(arming)
            self.progress.remove_task(resuming)
        await asyncio.sleep(0.5)  # the stopped workers' backends report their statement time on exit
        cost = dataclasses.replace(ended, database_s=await self.database_active_s()).per(before, count)
        check = await self.check_instances(prefix, ids, lambda i: {"n": i, "value": i + 1})
        if not check.ok:
            self.problem(f"timers: {check.describe()}")
        fired, committed = fire_lateness(notes)
        left = int(await self.scalar("SELECT count(*) FROM timers WHERE instance_id LIKE %s", prefix + "%"))
        if len(fired) + left != armed:
            self.problem(f"timers: {armed} armed, {len(fired)} fired, {left} left: one fired twice or never")
        woken, resumed = await self.resume_lateness(prefix)
        result: dict[str, Any] = {
            "timers": count,
            "spread_s": spread_s,
            "workers": 2,
            "schedulers": 2,
            "armed": armed,
            "due_ahead_s": DUE_AHEAD_S,
            "arming_s": last_armed - published,
            "fired": len(fired),
            "fire_lateness": summary_ms(fired),
            "commit_lateness": summary_ms(committed),
            "all_fired_after_s": max(fired) if fired else math.nan,
            "wake_lateness": summary_ms(woken),
            "resume_lateness": summary_ms(resumed),
            "all_resumed_after_s": max(resumed) if resumed else math.nan,
            # Resumed per second, from the moment they were due (all at once) to the last.
            "resumed_per_s": len(resumed) / max(resumed) if resumed and spread_s == 0 else math.nan,
            # What one resume cost, from just before the first was due to after the last.
            "ms_per_resume": cost,
            "check": {**asdict(check), "ok": check.ok},
        }
        self.note(
            f"timers due {variant}: fire lateness p50 {result['fire_lateness']['p50_ms']:.0f} ms,"
            f" p99 {result['fire_lateness']['p99_ms']:.0f} ms;"
            f" all fired after {result['all_fired_after_s']:.2f}s;"
            f" resume p99 {result['resume_lateness']['p99_ms']:.0f} ms"
        )
        return result

    async def resume_lateness(self, prefix: str) -> tuple[list[float], list[float]]:
        """Seconds after its due time each sleep was settled (the wake committed), and the step after it
        committed (what the user waits for), for the ``bench-nap`` instances under ``prefix``."""
        rows = await self.rows(
            "SELECT extract(epoch FROM s.finished_at - s.fire_at)::float8 AS woken,"
            " extract(epoch FROM a.finished_at - s.fire_at)::float8 AS resumed"
            " FROM steps s JOIN steps a ON a.instance_id = s.instance_id AND a.name = 'add'"
            " AND a.finished_at IS NOT NULL"
            " WHERE s.instance_id LIKE %s AND s.kind = 'sleep' AND s.finished_at IS NOT NULL",
            prefix + "%",
        )
        return [row["woken"] for row in rows], [row["resumed"] for row in rows]

    # ------------------------------------------------------------ 4. long workflows

    async def long(self) -> dict[str, Any]:
        k, long_steps, short_steps = self.sizes.long_instances, self.sizes.long_steps, self.sizes.short_steps
        short_count = k * long_steps // short_steps
        runs = {}
        for name, steps, count in (("long", long_steps, k), ("short", short_steps, short_count)):
            runs[name] = await self.engine_run(
                label=f"lw{name[0]}",
                workers=1,
                workflow=bench_chain,
                params=_chain_params(steps),
                expected=_chain_output(steps),
                count=count,
                steps_per_instance=steps,
                in_flight=k,
                description=f"long workflows: {count} x {steps} steps, {k} in flight",
            )
        long_run, short_run = runs["long"], runs["short"]
        wall_long = 1000.0 * long_run.elapsed_s / max(long_run.steps, 1)
        wall_short = 1000.0 * short_run.elapsed_s / max(short_run.steps, 1)
        result = {
            "in_flight": k,
            "workers": 1,
            "long": long_run.as_json(),
            "short": short_run.as_json(),
            "wall_ms_per_step": {"long": wall_long, "short": wall_short, "ratio": wall_long / wall_short},
            "worker_cpu_ms_per_step": {
                "long": long_run.worker_cpu_ms_per_step,
                "short": short_run.worker_cpu_ms_per_step,
                "ratio": long_run.worker_cpu_ms_per_step / short_run.worker_cpu_ms_per_step,
            },
            "machine_cpu_ms_per_step": {
                "long": long_run.machine_cpu_ms_per_step,
                "short": short_run.machine_cpu_ms_per_step,
                "ratio": long_run.machine_cpu_ms_per_step / short_run.machine_cpu_ms_per_step,
            },
        }
        self.note(
            f"long workflows: {wall_long:.1f} ms/step ({long_steps}-step) vs {wall_short:.1f} ms/step"
            f" ({short_steps}-step), ratio {wall_long / wall_short:.2f}"
        )
        return result

    # ------------------------------------------------------------ 6. replay-check (the deploy gate)

    async def replaycheck(self) -> dict[str, Any]:
        """``stepline replay-check`` over unfinished 20-step histories: instances/s and peak memory.

        The histories are inserted directly (one INSERT ... SELECT per table), as
        if a deploy found them mid-run: 20 succeeded steps of ``bench-chain`` each,
        instance still running. Checked at a fifth of the size and at full size:
        the check streams pages, so its peak memory should not grow with the count.
        """
        await self.reset("replay-check")
        total = self.sizes.replay_instances
        runs = []
        inserted = 0
        for size in (total // 5, total):
            await self._insert_histories(inserted, size)
            inserted = size
            runs.append(await self._replay_check_run(size))
        small, full = runs
        result = {"steps": REPLAY_STEPS, "runs": runs, "instances_per_s": full["instances_per_s"]}
        self.note(
            f"replay-check: {full['instances_per_s']:.0f} instances/s over {total:,} x {REPLAY_STEPS}-step"
            f" histories, peak RSS {full['peak_rss_mib']:.0f} MiB ({small['peak_rss_mib']:.0f} MiB"
            f" at {small['instances']:,})"
        )
        return result

    async def _insert_histories(self, first: int, end: int) -> None:
        """Instances ``first`` to ``end`` of ``bench-chain``, each with REPLAY_STEPS succeeded steps."""
        async with self.connection() as conn:
            await conn.execute(
                "INSERT INTO instances (id, workflow, status, params)"
                " SELECT 'rc-' || lpad(i::text, 7, '0'), %s, 'running',"
                " jsonb_build_object('n', i, 'steps', %s::int)"
                " FROM generate_series(%s::int, %s::int) AS i",
                (bench_chain.name, REPLAY_STEPS + 1, first, end - 1),
            )
            # The step "add" #k returned n + k; a 21st is still to run (the instance is running).
            await conn.execute(
                "INSERT INTO steps (instance_id, name, occurrence, position, kind, status, attempt, result)"
                " SELECT 'rc-' || lpad(i::text, 7, '0'), 'add', k, k, 'step', 'succeeded', 1, to_jsonb(i + k)"
                " FROM generate_series(%s::int, %s::int) AS i, generate_series(1, %s::int) AS k",
                (first, end - 1, REPLAY_STEPS),
            )
            await conn.execute("ANALYZE instances, steps")

    async def _replay_check_run(self, instances: int) -> dict[str, Any]:
        argv = [str(BIN / "stepline"), "replay-check", "--workflows", "benchmarks.workflows", "--json"]
        task = self.progress.add_task(f"replay-check over {instances:,} instances", total=None)
        try:
            began = time.monotonic()
            process = await asyncio.create_subprocess_exec(
                *argv, env=self.fleet.env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
            )
            peak = 0
            communicate = asyncio.ensure_future(process.communicate())
            while not communicate.done():
                peak = max(peak, rss_kib(process.pid))
                await asyncio.wait({communicate}, timeout=0.05)
            stdout, stderr = communicate.result()
            elapsed = time.monotonic() - began
        finally:
            self.progress.remove_task(task)
        if process.returncode != 0:
            raise RuntimeError(f"replay-check exited {process.returncode}: {stderr.decode()[-500:]}")
        checked = json.loads(stdout)["checked"]
        if checked != instances:
            raise RuntimeError(f"replay-check checked {checked} instances, not {instances}")
        return {
            "instances": instances,
            "seconds": elapsed,
            "instances_per_s": instances / elapsed,
            "peak_rss_mib": peak / 1024,
        }


def fire_lateness(notes: Sequence[Path]) -> tuple[list[float], list[float]]:
    """Seconds each sleep fired, and was committed, after it was due (``benchmarks.timer_probe``)."""
    fired_late, committed_late = [], []
    for path in notes:
        if not path.exists():  # the scheduler did not stop cleanly: its timers count as never fired
            continue
        for line in path.read_text().splitlines():
            kind, due, fired, committed = json.loads(line)
            if kind == "sleep":
                fired_late.append(fired - due)
                committed_late.append(committed - due)
    return fired_late, committed_late


def _chain_params(steps: int) -> Callable[[int], BaseModel]:
    return lambda index: Chain(n=index, steps=steps)


def _chain_output(steps: int) -> Callable[[int], dict[str, Any]]:
    return lambda index: expected_count(index, steps)


async def start_all(
    producer: Producer, workflow: Workflow[Any, Any], params: Sequence[BaseModel], ids: Sequence[str]
) -> None:
    """Publish start events through the public API, a thousand confirms in flight at a time."""
    chunk = 1000
    for first in range(0, len(ids), chunk):
        await producer.start_batch(
            workflow, params[first : first + chunk], instance_ids=ids[first : first + chunk]
        )


CODE_POINT_LOCALES = frozenset({"c", "posix", "c.utf8", "c.utf-8"})
"""libc locales that compare ids by code point (as ``stepline.shared.db.store_postgres`` decides)."""


async def ids_sort_by_code_point(database_url: str) -> bool:
    """Whether the database's default collation is libc's and sorts by code point."""
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        row = await (
            await conn.execute(
                "SELECT coalesce(to_jsonb(d) ->> 'datlocprovider', 'c'), d.datcollate"
                " FROM pg_database d WHERE d.datname = current_database()"
            )
        ).fetchone()
    return row is not None and row[0] == "c" and str(row[1]).lower() in CODE_POINT_LOCALES
