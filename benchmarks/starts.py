"""The starts section: how many starts a second 2 workers take end to end, and one start_batch of 10,000.

Issue 23, item 1. ``python -m benchmarks --only starts``:

- sustained: for ``starts_s`` seconds (30 in the full run, 10 with ``--quick``)
  the bench publishes ``bench-sleep`` starts with ``Producer.start_batch`` in
  batches of ``BATCH``, as fast as the 2 workers take them (no more than
  ``MAX_BACKLOG`` published and not yet a row, so the queue does not just
  grow and the latency is not only the time spent queued). A start is done
  when the worker's start transaction committed: the instance row and its
  first step (a durable sleep a day away: its ``steps`` row, queued, and its
  timer) are written in the one transaction, so the
  instance's ``created_at`` is when its first step was queued too. The figure
  is the rows whose ``created_at`` falls in the publishing window, per second
  of it; latency is ``created_at`` against the moment its batch was published.
  The sleep keeps the workers' work to the starts alone: no step runs after it.
- batch: one ``start_batch`` call of ``starts_batch`` (10,000) starts: the
  call's wall time (every publish confirmed) and when all its rows exist.
"""

from __future__ import annotations

import asyncio
import math
import time
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg.rows import DictRow
from rich.console import Console
from rich.table import Table

from benchmarks.procs import cpu_seconds, machine_busy_seconds
from benchmarks.sections import DB_COUNTERS
from benchmarks.stats import summary_ms
from benchmarks.workflows import Alarm, bench_sleep
from stepline import Producer

if TYPE_CHECKING:
    from benchmarks.sections import Bench


WORKERS = 2
BATCH = 200
"""Starts per ``start_batch`` call in the sustained part."""
MAX_BACKLOG = 1_000
"""Published starts without their row yet, at most, before the publisher waits (a second at the target)."""
TARGET_PER_S = 1_000.0
"""Issue 23, item 1: starts a second, end to end, with 2 workers."""
TARGET_SECONDS = 30.0
"""Issue 23, item 1: sustained this long."""
TARGET_BATCH = 10_000
"""Issue 23, item 1: starts in one ``start_batch`` call."""
STALL_S = 60.0
"""Waiting for the rows of what was published gives up when none appeared for this long."""


async def run(bench: Bench) -> dict[str, Any]:
    """Both parts; returns what the report prints (and the JSON keeps)."""
    await bench.reset("starts")
    workers = await bench.start_workers("st", WORKERS)
    try:
        # One connection for the whole section: a shared server at its max_connections refuses new ones.
        async with bench.connection() as conn, Producer(bench.iso.amqp_url) as producer:
            db = _Db(conn)
            sustained = await _sustained(bench, db, producer, workers, bench.sizes.starts_s)
            batch = await _one_batch(bench, db, producer, workers, bench.sizes.starts_batch)
    finally:
        bench.fleet.stop(workers)
    result = {"workers": WORKERS, "sustained": sustained, "batch": batch}
    bench.note(
        f"starts: {sustained['starts_per_s']:,.0f} starts/s over {sustained['seconds']:g} s,"
        f" start_batch of {batch['starts']:,} in {batch['call_s']:.1f} s"
    )
    return result


class _Db:
    """The section's reads, on its one connection."""

    def __init__(self, conn: psycopg.AsyncConnection[DictRow]) -> None:
        self.conn = conn

    async def rows(self, sql: str, *params: Any) -> list[DictRow]:
        cursor = await self.conn.execute(sql, params)
        return list(await cursor.fetchall())

    async def count(self, prefix: str) -> int:
        found = await self.rows("SELECT count(*) AS n FROM instances WHERE id LIKE %s", prefix + "%")
        return int(found[0]["n"])

    async def stats(self) -> dict[str, int]:
        await asyncio.sleep(0.5)  # backends that just exited report their counters
        found = await self.rows(
            f"SELECT {', '.join(DB_COUNTERS)} FROM pg_stat_database WHERE datname = current_database()"
        )
        return {name: int(found[0][name]) for name in DB_COUNTERS}


async def _sustained(
    bench: Bench, db: _Db, producer: Producer, workers: list[Any], seconds: float
) -> dict[str, Any]:
    far = datetime.now(UTC) + timedelta(days=1)
    published: list[tuple[float, int, int]] = []  # (when, first index, count) per batch
    rows = 0
    stop = asyncio.Event()

    async def count_rows() -> None:
        nonlocal rows
        while not stop.is_set():
            rows = await db.count("st-")
            await asyncio.sleep(0.1)

    task = bench.progress.add_task(f"starts: publishing for {seconds:g} s", total=None)
    stats_before = await db.stats()
    cpu_before = [cpu_seconds(proc.pid) for proc in workers]
    machine_before = machine_busy_seconds()
    counter = asyncio.create_task(count_rows())
    began = time.time()
    deadline = began + seconds
    index = 0
    try:
        while time.time() < deadline:
            if index - rows >= MAX_BACKLOG:
                bench.check_alive(workers)
                await asyncio.sleep(0.02)
                continue
            ids = [f"st-{i:08d}" for i in range(index, index + BATCH)]
            at = time.time()
            await producer.start_batch(
                bench_sleep, [Alarm(n=i, due=far) for i in range(BATCH)], instance_ids=ids
            )
            published.append((at, index, BATCH))
            index += BATCH
            bench.progress.update(task, completed=rows)
        publish_end = time.time()
        await _until_rows(bench, db, "st-", index, workers)
    finally:
        stop.set()
        await counter
        bench.progress.remove_task(task)
    drained_s = time.time() - publish_end
    cpu = sum(cpu_seconds(proc.pid) - before for proc, before in zip(workers, cpu_before, strict=True))
    machine = machine_busy_seconds() - machine_before
    stats_after = await db.stats()
    created = {
        row["id"]: row["created_at"].timestamp()
        for row in await db.rows("SELECT id, created_at FROM instances WHERE id LIKE %s", "st-%")
    }
    with_step = int(
        (
            await db.rows(
                "SELECT count(DISTINCT s.instance_id) AS n FROM steps s JOIN timers t"
                " ON t.instance_id = s.instance_id WHERE s.instance_id LIKE %s AND s.kind = 'sleep'",
                "st-%",
            )
        )[0]["n"]
    )
    latency = [
        created[f"st-{i:08d}"] - at for at, first, count in published for i in range(first, first + count)
    ]
    in_window = sum(1 for value in created.values() if began <= value < deadline)
    per_second = _per_second(created.values(), began, seconds)
    return {
        "seconds": seconds,
        "batch_size": BATCH,
        "max_backlog": MAX_BACKLOG,
        "published": index,
        "published_per_s": index / (publish_end - began),
        "rows": len(created),
        "rows_with_first_step": with_step,
        "starts_per_s": in_window / seconds,
        "slowest_second": min(per_second) if per_second else 0,
        "fastest_second": max(per_second) if per_second else 0,
        "drained_s": drained_s,
        "start_to_row": summary_ms(latency),
        "worker_cpu_ms_per_start": cpu * 1000.0 / len(created) if created else math.nan,
        "machine_cpu_ms_per_start": machine * 1000.0 / len(created) if created else math.nan,
        "db_per_start": {
            name: (stats_after[name] - stats_before[name]) / len(created) if created else math.nan
            for name in stats_before
        },
        "ok": len(created) == index and with_step == index,
    }


def _per_second(created: Any, began: float, seconds: float) -> list[int]:
    """Rows created in each whole second of the publishing window."""
    buckets = [0] * int(seconds)
    for value in created:
        second = int(value - began)
        if 0 <= second < len(buckets):
            buckets[second] += 1
    return buckets


async def _one_batch(
    bench: Bench, db: _Db, producer: Producer, workers: list[Any], count: int
) -> dict[str, Any]:
    far = datetime.now(UTC) + timedelta(days=1)
    ids = [f"sb-{i:06d}" for i in range(count)]
    params = [Alarm(n=i, due=far) for i in range(count)]
    began = time.monotonic()
    error = None
    try:
        await producer.start_batch(bench_sleep, params, instance_ids=ids)
    except Exception as exc:  # a failed call is this part's figure, not the end of the section
        error = f"{type(exc).__name__}: {exc}"
        bench.problem(f"starts: start_batch of {count:,} failed: {error}")
    call_s = time.monotonic() - began
    rows = await db.count("sb-") if error else await _until_rows(bench, db, "sb-", count, workers)
    return {
        "starts": count,
        "call_s": call_s,
        "rows_s": time.monotonic() - began,
        "rows": rows,
        "error": error,
        "ok": error is None and rows == count,
    }


async def _until_rows(bench: Bench, db: _Db, prefix: str, count: int, workers: list[Any]) -> int:
    """Wait until ``count`` instance rows under ``prefix`` exist (or none appeared for ``STALL_S``)."""
    seen, last_change = -1, time.monotonic()
    while True:
        found = await db.count(prefix)
        if found >= count:
            return found
        if found != seen:
            seen, last_change = found, time.monotonic()
        elif time.monotonic() - last_change > STALL_S:
            bench.problem(f"starts: {found:,} of {count:,} {prefix} rows, none more for {STALL_S:.0f} s")
            return found
        bench.check_alive(workers)
        await asyncio.sleep(0.1)


def targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 23, item 1: the sustained rate, and one start_batch of 10,000."""
    sustained, batch = result["sustained"], result["batch"]
    rate = sustained["starts_per_s"]
    p99 = sustained["start_to_row"]["p99_ms"]
    p99_text = f"{p99:,.0f}" if isinstance(p99, int | float) and math.isfinite(p99) else "-"
    return [
        {
            "target": f">= {TARGET_PER_S:,.0f} starts/s sustained {TARGET_SECONDS:.0f} s,"
            f" {result['workers']} workers (issue 23)",
            "measured": f"{rate:,.0f} starts/s over {sustained['seconds']:g} s"
            f" (slowest second {sustained['slowest_second']:,}; p99 start-to-row {p99_text} ms)",
            "met": rate >= TARGET_PER_S and sustained["seconds"] >= TARGET_SECONDS and sustained["ok"],
        },
        {
            "target": f"start_batch of {TARGET_BATCH:,} in one call (issue 23)",
            "measured": f"{batch['starts']:,} in {batch['call_s']:.1f} s; {batch['rows']:,} rows"
            f" in {batch['rows_s']:.1f} s"
            + (f" (the call failed: {batch['error']})" if batch.get("error") else ""),
            "met": batch["starts"] >= TARGET_BATCH and batch["ok"],
        },
    ]


def checks(result: dict[str, Any]) -> list[tuple[str, bool]]:
    """Whether every published start became an instance row (with its first step)."""
    return [(f"starts/{part}", result[part]["ok"]) for part in ("sustained", "batch")]


def render(console: Console, result: dict[str, Any]) -> None:
    """The sustained rate with its latency and cost per start, then the one big batch."""
    sustained, batch = result["sustained"], result["batch"]
    console.print(
        f"\n[bold]Starts: start_batch of {sustained['batch_size']} for {sustained['seconds']:g} s into"
        f" {result['workers']} workers (instance row and first step written)[/]"
    )
    table = Table()
    for name in ("starts/s", "slowest s", "published/s", "p50 ms", "p99 ms", "worker CPU ms/start",
                 "commits/start", "rows inserted/start", "check"):  # fmt: skip
        table.add_column(name, justify="left" if name == "check" else "right")
    latency, db = sustained["start_to_row"], sustained.get("db_per_start") or {}
    table.add_row(
        _f(sustained["starts_per_s"], 0),
        f"{sustained['slowest_second']:,}",
        _f(sustained["published_per_s"], 0),
        _f(latency["p50_ms"], 0),
        _f(latency["p99_ms"], 0),
        _f(sustained["worker_cpu_ms_per_start"], 2),
        _f(db.get("xact_commit"), 2),
        _f(db.get("tup_inserted"), 2),
        "ok" if sustained["ok"] else "FAILED",
    )
    console.print(table)
    console.print(
        f"one start_batch of {batch['starts']:,}: the call {batch['call_s']:.1f} s,"
        f" all {batch['rows']:,} rows {batch['rows_s']:.1f} s after it began"
    )


def _f(value: Any, digits: int) -> str:
    return f"{value:,.{digits}f}" if isinstance(value, int | float) and math.isfinite(value) else "-"
