"""``python -m benchmarks.db_cost``: the database work of a step, a sleep and an event wait, by statement.

The figures of ``docs/scaling.md``. The run starts a PostgreSQL cluster of its own
(``benchmarks.pg_throwaway``, port 6541 unless ``--port``; the shared server is
never reconfigured) with ``pg_stat_statements`` preloaded, and real
``stepline-worker`` and ``stepline-scheduler`` processes on it and on a vhost of
its own on the configured RabbitMQ. For each workload it reads, before and after:

- ``pg_stat_statements`` (calls, rows, WAL bytes, execution time per statement),
  only for the engine's role (``postgres``): this run's own probes connect as
  another role, so they are not counted;
- ``pg_current_wal_lsn()``: every WAL byte the server wrote, autovacuum included;
- ``pg_stat_user_tables``: rows inserted, updated (of them HOT) and deleted, per table;
- the server's CPU: user plus system time of the postmaster and its children in
  ``/proc`` (exited children through the postmaster's ``cutime``/``cstime``),
  minus this run's probe backend. ``total_exec_time`` of ``pg_stat_statements``
  is printed beside it as the statements' share.

Background work (timer polls, outbox sweeps) is measured on the idle fleet for
``--idle`` seconds before each workload and subtracted at that rate. Each
workload starts after a ``CHECKPOINT``, with the reconciler off (its pass is a
per-minute cost, not a per-step one). Counts do not depend on the machine's load;
CPU times do (a shared machine inflates them), so read them as an upper bound.

Workloads, each ``--instances`` instances started at once on 2 workers:
``chain-10`` (``bench-chain`` of 10 steps: the throughput workload),
``chain-2``, ``sleep`` (step, 1 s sleep, step), ``event`` (step, wait for an event
with a 1 h time-out, step; the events are sent with ``Client.send_event`` once all
wait) and ``event-untimed`` (the same without a time-out). The differences give
a step's marginal cost ((chain-10 - chain-2) / 8) and a wait's (wait - chain-2).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn

import psycopg
from pydantic import BaseModel
from rich.console import Console
from rich.table import Table

from benchmarks.dbcost_workflows import EVENT_TYPE, Count, dbcost_event, dbcost_event_untimed, dbcost_sleep
from benchmarks.isolation import Isolation
from benchmarks.pg_throwaway import ThrowawayPostgres
from benchmarks.procs import CLOCK_TICKS, ROOT, SCHEDULER_READY, WORKER_READY, Fleet, child_env
from benchmarks.sections import ENGINE_TABLES
from benchmarks.workflows import Chain, bench_chain
from stepline import Client, Producer
from stepline.worker.workflow import Workflow

PORT = 6541
PROBE_ROLE = "dbcost_probe"
ENGINE_ROLE = "postgres"
SERVER_SETTINGS = {
    "shared_preload_libraries": "pg_stat_statements",
    "pg_stat_statements.max": "5000",
    "max_connections": "200",
    "shared_buffers": "128MB",
    # No checkpoint inside a workload: each starts right after one (see CHECKPOINT below).
    "checkpoint_timeout": "1h",
    "max_wal_size": "8GB",
    # Off, so that each workload's dead rows are vacuumed inside its window, by the VACUUM
    # it ends with, instead of by whichever autovacuum happens to run then.
    "autovacuum": "off",
}
WORKERS = 2
SETTLE_S = 2.5
"""Wait after the fleet is ready and after the last instance finished: backends report their
table statistics when idle, at most once a second; the last batched outbox deletes land."""
STALL_S = 120.0


@dataclass(frozen=True)
class Workload:
    """What one measurement starts, and what it is counted in."""

    name: str
    workflow: Workflow[Any, Any]
    params: Callable[[int], BaseModel]
    steps: int
    """Steps (``ctx.step``) each instance runs."""
    sends_events: bool = False


WORKLOADS = (
    Workload("chain-10", bench_chain, lambda n: Chain(n=n, steps=10), 10),
    Workload("chain-2", bench_chain, lambda n: Chain(n=n, steps=2), 2),
    Workload("sleep", dbcost_sleep, lambda n: Count(n=n), 2),
    Workload("event", dbcost_event, lambda n: Count(n=n), 2, sends_events=True),
    Workload("event-untimed", dbcost_event_untimed, lambda n: Count(n=n), 2, sends_events=True),
)


@dataclass
class Snapshot:
    """The server's counters at one moment."""

    at: float
    wal_bytes: float
    cpu_s: float
    statements: dict[str, dict[str, float]]
    """Per statement kind: calls, rows, wal_bytes, wal_fpi, exec_ms."""
    tables: dict[str, dict[str, float]]
    """Per table: ins, upd, hot, del."""


@dataclass
class Cost:
    """The work of one instance (or one unit derived from several workloads)."""

    statements: dict[str, dict[str, float]] = field(default_factory=dict)
    tables: dict[str, dict[str, float]] = field(default_factory=dict)
    wal_bytes: float = 0.0
    cpu_ms: float = 0.0
    exec_ms: float = 0.0

    @property
    def calls(self) -> float:
        return sum(entry["calls"] for entry in self.statements.values())

    @property
    def statement_wal_bytes(self) -> float:
        """The WAL the statements wrote (``pg_stat_statements``): the all-WAL figure less the server's own."""
        return sum(entry["wal_bytes"] for entry in self.statements.values())

    @property
    def rows_written(self) -> float:
        return sum(entry["ins"] + entry["upd"] + entry["del"] for entry in self.tables.values())

    def combine(self, other: Cost, factor: float) -> Cost:
        """``self + factor * other``, entry by entry."""
        return Cost(
            statements=_combine(self.statements, other.statements, factor),
            tables=_combine(self.tables, other.tables, factor),
            wal_bytes=self.wal_bytes + factor * other.wal_bytes,
            cpu_ms=self.cpu_ms + factor * other.cpu_ms,
            exec_ms=self.exec_ms + factor * other.exec_ms,
        )

    def scaled(self, factor: float) -> Cost:
        return Cost().combine(self, factor)

    def summary(self) -> dict[str, float]:
        return {
            "statements": self.calls,
            "rows_written": self.rows_written,
            "wal_bytes": self.wal_bytes,
            "statement_wal_bytes": self.statement_wal_bytes,
            "server_cpu_ms": self.cpu_ms,
            "exec_ms": self.exec_ms,
        }


def _combine(
    mine: dict[str, dict[str, float]], theirs: dict[str, dict[str, float]], factor: float
) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for key in mine.keys() | theirs.keys():
        left, right = mine.get(key, {}), theirs.get(key, {})
        out[key] = {name: left.get(name, 0.0) + factor * right.get(name, 0.0) for name in left.keys() | right}
    return out


# ---------------------------------------------------------------- reading the server

_CTE = re.compile(r"(?:\bWITH|,)\s+(\w+) AS \(", re.IGNORECASE)
_VERB = re.compile(r"^(INSERT INTO|UPDATE|DELETE FROM)\s+(\w+)", re.IGNORECASE)
_FROM = re.compile(r"\bFROM\s+(\w+)", re.IGNORECASE)


def statement_kind(query: str) -> str:
    """A short name for a statement: its CTEs' names, or its verb and first table."""
    text = " ".join(query.split())
    upper = text.upper()
    if upper.startswith("WITH"):
        return "WITH " + ", ".join(_CTE.findall(text))
    verb = _VERB.match(text)
    if verb:
        return f"{verb.group(1).upper()} {verb.group(2)}"
    if upper.startswith("SELECT"):
        table = _FROM.search(text)
        return f"SELECT ... FROM {table.group(1)}" if table else text[:60]
    return text[:60]


def server_cpu_s(postmaster: int, exclude: set[int]) -> float:
    """CPU seconds of the postmaster, its live children and its reaped children, less ``exclude``."""
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile: its time is in the postmaster's cutime now
        pid, ppid = int(entry.name), int(fields[1])
        if pid == postmaster:
            total += sum(int(value) for value in fields[11:15])  # utime, stime, cutime, cstime
        elif ppid == postmaster and pid not in exclude:
            total += int(fields[11]) + int(fields[12])
    return total / CLOCK_TICKS


STATEMENTS_SQL = """
SELECT s.query, s.calls, s.rows, s.wal_bytes, s.wal_fpi, s.total_exec_time
FROM pg_stat_statements s
JOIN pg_database d ON d.oid = s.dbid
JOIN pg_roles r ON r.oid = s.userid
WHERE d.datname = current_database() AND r.rolname = %s
"""
TABLES_SQL = "SELECT relname, n_tup_ins, n_tup_upd, n_tup_hot_upd, n_tup_del FROM pg_stat_user_tables"


class Probe:
    """This run's own connection (role ``dbcost_probe``): its statements and CPU are left out."""

    def __init__(self, url: str, postmaster: int) -> None:
        self.conn = psycopg.connect(url, autocommit=True)
        row = self.conn.execute("SELECT pg_backend_pid()").fetchone()
        assert row is not None
        self.backend = int(row[0])
        self.postmaster = postmaster

    def scalar(self, sql: str, *params: Any) -> Any:
        row = self.conn.execute(sql.encode(), params).fetchone()
        return None if row is None else row[0]

    def snapshot(self) -> Snapshot:
        statements: dict[str, dict[str, float]] = {}
        for query, calls, rows, wal, fpi, exec_ms in self.conn.execute(
            STATEMENTS_SQL.encode(), (ENGINE_ROLE,)
        ):
            entry = statements.setdefault(
                statement_kind(query), {"calls": 0, "rows": 0, "wal_bytes": 0, "wal_fpi": 0, "exec_ms": 0}
            )
            for name, value in (("calls", calls), ("rows", rows), ("wal_bytes", wal), ("wal_fpi", fpi)):
                entry[name] += float(value)
            entry["exec_ms"] += float(exec_ms)
        return Snapshot(
            at=time.monotonic(),
            wal_bytes=float(self.scalar("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')")),
            cpu_s=server_cpu_s(self.postmaster, {self.backend}),
            statements=statements,
            tables=self.tables(),
        )

    def tables(self) -> dict[str, dict[str, float]]:
        """Rows inserted, updated (of them HOT) and deleted so far, per table."""
        return {
            name: {"ins": float(ins), "upd": float(upd), "hot": float(hot), "del": float(dele)}
            for name, ins, upd, hot, dele in self.conn.execute(TABLES_SQL.encode())
        }

    def close(self) -> None:
        self.conn.close()


def difference(before: Snapshot, after: Snapshot) -> Cost:
    """What the server did between two snapshots."""
    return Cost(
        statements=_combine(after.statements, before.statements, -1.0),
        tables=_combine(after.tables, before.tables, -1.0),
        wal_bytes=after.wal_bytes - before.wal_bytes,
        cpu_ms=1000.0 * (after.cpu_s - before.cpu_s),
        exec_ms=sum(entry["exec_ms"] for entry in after.statements.values())
        - sum(entry["exec_ms"] for entry in before.statements.values()),
    )


# ---------------------------------------------------------------- one workload


@dataclass
class Measured:
    """One workload's outcome: its cost per instance, with background subtracted."""

    workload: str
    instances: int
    steps_per_instance: int
    seconds: float
    idle_seconds: float
    per_instance: Cost
    background_per_s: Cost


async def wait_for(probe: Probe, sql: str, goal: int, what: str) -> None:
    """Poll ``sql`` (a count) until it reaches ``goal``; raise if it stops moving for ``STALL_S``."""
    last, moved = -1, time.monotonic()
    while True:
        count = int(probe.scalar(sql))
        if count >= goal:
            return
        if count != last:
            last, moved = count, time.monotonic()
        elif time.monotonic() - moved > STALL_S:
            raise RuntimeError(f"{what}: stuck at {count}/{goal} for {STALL_S:.0f}s")
        await asyncio.sleep(0.25)


async def send_events(iso: Isolation, ids: list[str]) -> None:
    async with Client(iso.database_url, iso.amqp_url) as client:
        gate = asyncio.Semaphore(8)  # the Client opens 8 connections at most

        async def one(instance_id: str) -> None:
            async with gate:
                await client.send_event(instance_id, EVENT_TYPE, {"ok": True})

        await asyncio.gather(*(one(instance_id) for instance_id in ids))


async def measure(
    workload: Workload, iso: Isolation, probe: Probe, fleet: Fleet, args: argparse.Namespace
) -> Measured:
    """Run one workload on a fresh fleet; its cost per instance."""
    probe.conn.execute(f"TRUNCATE {ENGINE_TABLES} CASCADE".encode())
    probe.conn.execute(b"CHECKPOINT")
    procs = [
        fleet.worker(f"{workload.name}-w{n + 1}", "--workflows", "benchmarks.dbcost_workflows")
        for n in range(WORKERS)
    ]
    scheduler = fleet.scheduler(f"{workload.name}-s1")
    try:
        await fleet.wait_ready(procs, WORKER_READY)
        await fleet.wait_ready([scheduler], SCHEDULER_READY)
        await asyncio.sleep(SETTLE_S)
        idle_from = probe.snapshot()
        await asyncio.sleep(args.idle)
        idle_to = probe.snapshot()
        count = args.instances
        ids = [f"{workload.name}-{n:06d}" for n in range(count)]
        async with Producer(iso.amqp_url) as producer:
            for first in range(0, count, 1000):
                chunk = range(first, min(count, first + 1000))
                await producer.start_batch(
                    workload.workflow,
                    [workload.params(n) for n in chunk],
                    instance_ids=[ids[n] for n in chunk],
                )
        if workload.sends_events:
            await wait_for(probe, "SELECT count(*) FROM instances WHERE status = 'waiting'", count, "waiting")
            await send_events(iso, ids)
        await wait_for(probe, "SELECT count(*) FROM instances WHERE status = 'complete'", count, "complete")
        await asyncio.sleep(SETTLE_S)
        with psycopg.connect(iso.database_url, autocommit=True) as engine:  # the engine's role: counted
            engine.execute(f"VACUUM {ENGINE_TABLES}".encode())
        done = probe.snapshot()
    finally:
        fleet.stop([*procs, scheduler])
    # A backend reports its table counters when idle at most every 10 s, and always when it exits.
    await asyncio.sleep(1.0)
    done.tables = probe.tables()
    idle_s, work_s = idle_to.at - idle_from.at, done.at - idle_to.at
    background = difference(idle_from, idle_to).scaled(1.0 / idle_s)
    work = difference(idle_to, done).combine(background, -work_s)
    return Measured(
        workload.name, count, workload.steps, work_s, idle_s, work.scaled(1.0 / count), background
    )


# ---------------------------------------------------------------- units and output


def units(measured: dict[str, Measured]) -> dict[str, Cost]:
    """Costs of one step, one sleep, one event wait, from the workloads' per-instance costs."""
    chain10, chain2 = measured["chain-10"].per_instance, measured["chain-2"].per_instance
    step = chain10.combine(chain2, -1.0).scaled(1 / 8)
    found = {
        "step of a chain (marginal: (chain-10 - chain-2) / 8)": step,
        "step of the throughput workload (chain-10 / 10)": chain10.scaled(1 / 10),
        "start + finish of an instance (chain-2 - 2 steps)": chain2.combine(step, -2.0),
    }
    for name, label in (
        ("sleep", "sleep and wake (sleep - chain-2)"),
        ("event", "event wait with time-out, send_event (event - chain-2)"),
        ("event-untimed", "event wait without time-out (event-untimed - chain-2)"),
    ):
        if name in measured:
            found[label] = measured[name].per_instance.combine(chain2, -1.0)
    return found


def _fmt(value: float, digits: int = 2) -> str:
    return f"{value:,.{digits}f}"


def render(console: Console, measured: dict[str, Measured], derived: dict[str, Cost]) -> None:
    for one in measured.values():
        cost = one.per_instance
        table = Table(
            title=f"{one.workload}: per instance ({one.instances} instances, "
            f"{one.steps_per_instance} steps each, {one.seconds:.1f}s; "
            f"background of {one.idle_seconds:.0f}s idle subtracted)",
            title_justify="left",
        )
        for column in ("statement", "calls", "rows returned", "WAL bytes", "WAL FPI", "exec ms"):
            table.add_column(column, justify="left" if column == "statement" else "right")
        for kind, entry in sorted(cost.statements.items(), key=lambda item: -item[1]["calls"]):
            if abs(entry["calls"]) < 0.005 and abs(entry["wal_bytes"]) < 1:  # the closing VACUUM shows
                continue
            table.add_row(
                kind[:90], _fmt(entry["calls"]), _fmt(entry["rows"]), _fmt(entry["wal_bytes"], 0),
                _fmt(entry["wal_fpi"]), _fmt(entry["exec_ms"], 3),
            )  # fmt: skip
        console.print(table)
        rows = Table(title=f"{one.workload}: rows written per instance", title_justify="left")
        for column in ("table", "inserted", "updated", "of them HOT", "deleted"):
            rows.add_column(column, justify="left" if column == "table" else "right")
        for name, entry in sorted(cost.tables.items()):
            if max(abs(entry["ins"]), abs(entry["upd"]), abs(entry["del"])) >= 0.005:
                rows.add_row(
                    name, _fmt(entry["ins"]), _fmt(entry["upd"]), _fmt(entry["hot"]), _fmt(entry["del"])
                )
        console.print(rows)
        console.print(
            f"  all WAL {cost.wal_bytes:,.0f} B (statements' {cost.statement_wal_bytes:,.0f} B), "
            f"server CPU {cost.cpu_ms:.3f} ms (/proc), "
            f"statements' exec time {cost.exec_ms:.3f} ms (pg_stat_statements) per instance\n"
        )
    summary = Table(title="Database work per unit (background subtracted)", title_justify="left")
    for column in (
        "unit",
        "statements",
        "rows written",
        "WAL bytes",
        "server CPU ms",
        "exec ms",
        "per core /s",
    ):
        summary.add_column(column, justify="left" if column == "unit" else "right")
    for label, cost in derived.items():
        per_core = f"{1000.0 / cost.cpu_ms:,.0f}" if cost.cpu_ms > 0 else "-"
        summary.add_row(
            label, _fmt(cost.calls), _fmt(cost.rows_written), _fmt(cost.wal_bytes, 0),
            _fmt(cost.statement_wal_bytes, 0), _fmt(cost.cpu_ms, 3),
            _fmt(cost.exec_ms, 3), per_core,
        )  # fmt: skip
    console.print(summary)


def _interrupt(*_: object) -> NoReturn:
    raise KeyboardInterrupt


async def run_all(
    iso: Isolation, probe: Probe, fleet: Fleet, args: argparse.Namespace
) -> dict[str, Measured]:
    measured: dict[str, Measured] = {}
    chosen = [w for w in WORKLOADS if not args.only or w.name in args.only or w.name.startswith("chain")]
    for workload in chosen:
        print(f"db_cost: {workload.name}, {args.instances} instances ...", flush=True)
        measured[workload.name] = await measure(workload, iso, probe, fleet, args)
    return measured


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.db_cost", description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, default=PORT, help="the throwaway cluster's port (default 6541)")
    parser.add_argument("--instances", type=int, default=1000, help="instances per workload (default 1000)")
    parser.add_argument(
        "--idle", type=float, default=10.0, help="seconds of idle fleet measured per workload"
    )
    parser.add_argument(
        "--only", action="append", choices=[w.name for w in WORKLOADS], help="workloads (chains always run)"
    )
    parser.add_argument("--amqp-url", default=os.environ.get("STEPLINE_AMQP_URL"))
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    console = Console(width=170)
    log_dir = Path(tempfile.mkdtemp(prefix="stepline-dbcost-"))
    cluster = ThrowawayPostgres(args.port, SERVER_SETTINGS)
    failed = True
    with cluster.running():
        iso = Isolation.new(cluster.url, args.amqp_url)
        fleet = Fleet(
            {**child_env(iso.database_url, iso.amqp_url), "STEPLINE_SCHEDULER__RECONCILE_INTERVAL": "0"},
            log_dir,
        )
        try:
            iso.create()
            with psycopg.connect(iso.database_url, autocommit=True) as admin:
                admin.execute(b"CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
                admin.execute(f"CREATE ROLE {PROBE_ROLE} LOGIN SUPERUSER".encode())
            probe = Probe(iso.database_url.replace("postgres@", f"{PROBE_ROLE}@", 1), cluster.pid)
            try:
                measured = asyncio.run(run_all(iso, probe, fleet, args))
            finally:
                probe.close()
            failed = False
        finally:
            fleet.stop_all()
            iso.drop()
    derived = units(measured)
    render(console, measured, derived)
    results = {
        "meta": {
            "started": datetime.now(UTC).isoformat(timespec="seconds"),
            "workers": WORKERS,
            "settings": SERVER_SETTINGS,
        },
        "workloads": {name: asdict(one) for name, one in measured.items()},
        "units": {
            label: {**cost.summary(), "statements_by_kind": cost.statements, "tables": cost.tables}
            for label, cost in derived.items()
        },
    }
    out = ROOT / "benchmarks" / "results" / f"dbcost-{datetime.now(UTC):%Y%m%dT%H%M%SZ}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    console.print(f"results: {out.relative_to(ROOT)}")
    if not failed:
        shutil.rmtree(log_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
