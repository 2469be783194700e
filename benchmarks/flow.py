"""The flow-control section: what a step limit costs a step, and what a waiting step costs the database.

``python -m benchmarks --only flow``:

- overhead: the throughput workload (10 trivial steps per instance, 2 workers)
  with ``ConcurrencyLimit(key, 10_000)`` on every step (a limit that never
  binds) against the same workload without limits, runs alternating in one
  session; the ratio of their steps/s is the cost of taking and giving back a slot.
  The limit runs with the workers' slot reserves and without them (a slot taken
  and given back per step), so both ways compare in one session.
- waiting: 1,000 steps wait on one key behind a holder (``ConcurrencyLimit("bench-one", 1)``);
  PostgreSQL's own counters over a quiet interval, with the waiters and
  without them (the holder alone), divided by the waiters: the work each waiting step costs.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from typing import Any

from rich.console import Console
from rich.table import Table

from benchmarks.procs import SCHEDULER_READY, Proc
from benchmarks.sections import Bench, start_all
from benchmarks.workflows import TEN, Hold, Job, bench_hold, bench_ten, bench_ten_limited, expected_count
from stepline import Producer

ROUNDS = 3
"""Alternating rounds of runs (without, with the limit per step, with reserves) in the overhead part."""
VARIANTS = ("plain", "per_step", "reserved")
WORKERS = 2
WAITERS = 1_000
QUIET_S = 20.0
"""The interval over which the database's counters are read, with and without the waiters."""
COUNTERS = (
    "xact_commit",
    "tup_returned",
    "tup_fetched",
    "tup_inserted",
    "tup_updated",
    "tup_deleted",
    "blks_hit",
)


async def run(bench: Bench) -> dict[str, Any]:
    """Both parts; returns what the report prints (and the JSON keeps)."""
    result: dict[str, Any] = {"overhead": await overhead(bench)}
    result["waiting"] = await waiting(bench)
    return result


async def overhead(bench: Bench) -> dict[str, Any]:
    """Steps/s with a limit that never binds against none, alternating, ``ROUNDS`` rounds.

    The limit runs twice a round: with the workers' slot reserves (the default)
    and with ``STEPLINE_LIMITS__RESERVE=0`` (each step takes and gives back its
    own slot, as before reserves), so the two ways compare in one session.
    """
    runs: dict[str, list[float]] = {name: [] for name in VARIANTS}
    db: dict[str, list[dict[str, float]]] = {name: [] for name in VARIANTS}
    for round_ in range(ROUNDS):
        for name in VARIANTS:
            workflow = bench_ten if name == "plain" else bench_ten_limited
            if name == "per_step":
                bench.fleet.env["STEPLINE_LIMITS__RESERVE"] = "0"
            try:
                engine = await bench.engine_run(
                    label=f"flow-{name.replace('_', '')}{round_}",
                    workers=WORKERS,
                    workflow=workflow,
                    params=lambda i: Job(n=i),
                    expected=lambda i: expected_count(i, TEN),
                    count=bench.sizes.instances,
                    steps_per_instance=TEN,
                    description=f"flow overhead, {name}, round {round_ + 1}",
                )
            finally:
                bench.fleet.env.pop("STEPLINE_LIMITS__RESERVE", None)
            runs[name].append(engine.steps_per_s)
            db[name].append(engine.db_per_step)
    medians = {name: statistics.median(found) for name, found in runs.items()}
    ratio = medians["reserved"] / medians["plain"]
    per_step_ratio = medians["per_step"] / medians["plain"]
    bench.note(
        f"flow overhead: {medians['reserved']:.0f} steps/s with a limit that never binds (reserves),"
        f" {medians['per_step']:.0f} with a slot taken per step, {medians['plain']:.0f} without"
        f" (medians of {ROUNDS}): {ratio:.2f}x ({100 * (1 - ratio):.1f}% slower);"
        f" per step {per_step_ratio:.2f}x"
    )
    return {
        "workers": WORKERS,
        "instances": bench.sizes.instances,
        "steps_per_s_without": runs["plain"],
        "steps_per_s_with_limit": runs["reserved"],
        "steps_per_s_per_step": runs["per_step"],
        "median_without": medians["plain"],
        "median_with_limit": medians["reserved"],
        "median_per_step": medians["per_step"],
        "ratio": ratio,
        "ratio_per_step": per_step_ratio,
        "db_per_step_without": _mean(db["plain"]),
        "db_per_step_with_limit": _mean(db["reserved"]),
        "db_per_step_per_step": _mean(db["per_step"]),
    }


async def waiting(bench: Bench) -> dict[str, Any]:
    """PostgreSQL's work per waiting step, over a quiet interval, with 1,000 waiters and without."""
    await bench.reset("flow waiting")
    async with bench.connection() as conn:
        await conn.execute("DELETE FROM limit_keys")
    procs: list[Proc] = await bench.start_workers("flow-wait", 1)
    scheduler = bench.fleet.scheduler("flow-wait-s1")
    procs.append(scheduler)
    try:
        await bench.fleet.wait_ready([scheduler], SCHEDULER_READY)
        async with Producer(bench.iso.amqp_url) as producer:
            await producer.start(bench_hold, Hold(seconds=3 * QUIET_S + 120), instance_id="flow-holder")
            await _until(bench, "SELECT count(*) FROM limit_holds", 1, what="the holder's slot")
            await asyncio.sleep(2.0)  # the start's own writes settle
            alone = await _quiet(bench)
            ids = [f"flow-waiter-{n:05d}" for n in range(WAITERS)]
            began = time.monotonic()
            await start_all(producer, bench_hold, [Hold(seconds=0)] * WAITERS, ids)
            await _until(bench, "SELECT count(*) FROM limit_waiters", WAITERS, what="the waiters")
            queued_s = time.monotonic() - began
            await asyncio.sleep(2.0)
            waiters = await _quiet(bench)
    finally:
        bench.fleet.stop(procs)
    extra = {name: waiters[name] - alone[name] for name in COUNTERS}
    per_waiter = {name: extra[name] / WAITERS for name in COUNTERS}
    bench.note(
        f"flow waiting: {WAITERS} steps waiting on one key for {QUIET_S:.0f}s cost"
        f" {extra['xact_commit']:+d} transactions and {extra['tup_fetched']:+d} rows fetched"
        f" beyond the holder alone ({per_waiter['xact_commit']:.4f} transactions per waiter)"
    )
    return {
        "waiters": WAITERS,
        "quiet_s": QUIET_S,
        "queued_s": queued_s,
        "holder_alone": alone,
        "with_waiters": waiters,
        "extra": extra,
        "per_waiter": per_waiter,
    }


async def _quiet(bench: Bench) -> dict[str, int]:
    """This database's counters over ``QUIET_S`` seconds (the two reads' own work included)."""
    before = await _counters(bench)
    await asyncio.sleep(QUIET_S)
    after = await _counters(bench)
    return {name: after[name] - before[name] for name in COUNTERS}


async def _counters(bench: Bench) -> dict[str, int]:
    await asyncio.sleep(0.6)  # the statistics collector reports a backend's counters at most twice a second
    row = (
        await bench.rows(
            f"SELECT {', '.join(COUNTERS)} FROM pg_stat_database WHERE datname = current_database()"
        )
    )[0]
    return {name: int(row[name]) for name in COUNTERS}


async def _until(bench: Bench, sql: str, count: int, *, what: str, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while int(await bench.scalar(sql)) < count:
        if time.monotonic() > deadline:
            raise RuntimeError(f"flow: {what} did not appear within {timeout_s:.0f}s")
        await asyncio.sleep(0.2)


def _mean(runs: list[dict[str, float]]) -> dict[str, float]:
    names = {name for run in runs for name in run}
    return {name: statistics.fmean(run.get(name, 0.0) for run in runs) for name in sorted(names)}


def render(console: Console, flow: dict[str, Any]) -> None:
    """The section's two tables."""
    over = flow.get("overhead")
    if over:
        table = Table(
            title=f"Flow control: a limit that never binds, {over['workers']} workers", title_justify="left"
        )
        table.add_column("")
        table.add_column("steps/s (median)", justify="right")
        table.add_column("runs", justify="right")
        table.add_column("commits/step", justify="right")
        rows = [
            ("no limit", over["median_without"], over["steps_per_s_without"], over["db_per_step_without"]),
            (
                "ConcurrencyLimit(k, 10_000), reserves",
                over["median_with_limit"],
                over["steps_per_s_with_limit"],
                over["db_per_step_with_limit"],
            ),
        ]
        if "median_per_step" in over:
            rows.insert(
                1,
                (
                    "ConcurrencyLimit(k, 10_000), a slot per step",
                    over["median_per_step"],
                    over["steps_per_s_per_step"],
                    over["db_per_step_per_step"],
                ),
            )
        for label, median, runs, db in rows:
            table.add_row(
                label,
                f"{median:.0f}",
                ", ".join(f"{one:.0f}" for one in runs),
                f"{db.get('xact_commit', 0):.2f}",
            )
        table.caption = f"ratio {over['ratio']:.2f} ({100 * (1 - over['ratio']):.1f}% slower with the limit)"
        if "ratio_per_step" in over:
            table.caption += f"; a slot per step (STEPLINE_LIMITS__RESERVE=0): {over['ratio_per_step']:.2f}"
        console.print(table)
    wait = flow.get("waiting")
    if wait:
        table = Table(
            title=f"Flow control: {wait['waiters']:,} steps waiting on one key, {wait['quiet_s']:.0f}s quiet",
            title_justify="left",
        )
        table.add_column("counter")
        for column in ("holder alone", "with the waiters", "per waiter"):
            table.add_column(column, justify="right")
        for name in COUNTERS:
            table.add_row(
                name,
                f"{wait['holder_alone'][name]:,}",
                f"{wait['with_waiters'][name]:,}",
                f"{wait['per_waiter'][name]:.4f}",
            )
        console.print(table)
