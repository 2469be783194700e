"""The long-workflow section's big chain: cost per 1,000-step window, a worker SIGKILLed mid-run, the replay.

Part of ``python -m benchmarks --only long`` (issue 23, item 4), after the 1,000- against
10-step comparison of ``Bench.long``:

- windows: one ``bench-chain`` instance of ``long_chain_steps`` (10,000 in the full
  run) on 1 worker. Each 1,000-step window's wall time comes from the steps' own
  rows (``finished_at`` of its last step minus that of the window before), its
  worker CPU from samples of the worker's ``/proc`` CPU time taken as the steps
  commit. Target: the last window within 1.5x of the first.
- kill: the same chain on 1 worker, SIGKILLed once half its steps are committed,
  a replacement started at once. Measured: kill to the next committed step (what
  the user waits for), kill to the replacement being ready, and whether the chain
  then completes with every step committed once. Target: within 5 s.
- replay: the finished history read back in the driver the way a worker reads
  it (``Store.load_history``, one statement) and replayed from the start
  (``Replay.start``): the time each takes, and the history's size in memory.
"""

from __future__ import annotations

import asyncio
import math
import os
import signal
import statistics
import time
import tracemalloc
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import psycopg
from psycopg.rows import DictRow
from rich.console import Console
from rich.table import Table

from benchmarks.procs import WORKER_READY, Proc, cpu_seconds
from benchmarks.sections import Bench
from benchmarks.workflows import Chain, bench_chain, expected_count
from stepline import Producer
from stepline.shared.db.stores import create_store
from stepline.worker.replay.engine import Replay

WINDOW = 1_000
"""Steps per window whose cost is compared (first against last)."""
WINDOW_RATIO_LIMIT = 1.5
"""Issue 23: the last 1,000 steps of a 10,000-step workflow cost within 1.5x of the first 1,000."""
KILL_LIMIT_S = 5.0
"""Issue 23: after a worker is SIGKILLed mid-run and replaced, the next step runs within 5 s."""
SAMPLE_S = 0.05
"""How often the driver reads the committed steps and the worker's CPU."""
SETTLE_S = 0.3
"""After the kill: a commit statement the dead worker had sent may still land; the count is read after."""
STALL_S = 90.0


@dataclass
class Sampler:
    """(committed steps, worker CPU seconds, driver clock) as the chain advances."""

    samples: list[tuple[int, float, float]] = field(default_factory=list)

    def cpu_at(self, steps: int) -> float:
        """The worker's CPU time when ``steps`` steps had committed (interpolated between samples)."""
        before = max((s for s in self.samples if s[0] <= steps), default=None, key=lambda s: s[0])
        after = min((s for s in self.samples if s[0] >= steps), default=None, key=lambda s: s[0])
        if before is None or after is None:
            return math.nan
        if after[0] == before[0]:
            return before[1]
        share = (steps - before[0]) / (after[0] - before[0])
        return before[1] + share * (after[1] - before[1])


async def run(bench: Bench) -> dict[str, Any]:
    """The three parts; returns what the report prints (and the JSON keeps)."""
    steps = bench.sizes.long_chain_steps
    windows = await _windows(bench, steps)
    replay = await _replay(bench, windows["instance_id"])  # before the next part empties the tables
    kill = await _kill(bench, steps)
    first, last = windows["windows"][0], windows["windows"][-1]
    bench.note(
        f"long chain: {steps:,} steps, first {WINDOW:,} {first['wall_s']:.2f}s, last {last['wall_s']:.2f}s"
        f" ({windows['wall_ratio']:.2f}x); kill to next step {kill['kill_to_next_step_s']:.2f}s;"
        f" load {replay['load_ms']:.0f} ms + replay {replay['replay_ms']:.0f} ms"
    )
    return {"steps": steps, "window": WINDOW, "windows": windows, "kill": kill, "replay": replay}


Conn = psycopg.AsyncConnection[DictRow]


async def _progress(conn: Conn, instance_id: str) -> tuple[int, bool]:
    """Steps of the chain committed so far (an index read of the attempts), and whether it finished.

    On one connection held by the caller, and written so that the plan is one step
    back along the primary key: a connection per poll cost PostgreSQL more rows (its
    catalogue) than the steps it counted, and ``max(occurrence)`` on the tables
    without statistics (as ``Bench.reset`` leaves them) read every attempt of the
    instance at each poll, which PostgreSQL's rows read per step showed as growing
    with the history.
    """
    cursor = await conn.execute(
        "SELECT (SELECT occurrence FROM step_attempts WHERE instance_id = %(id)s AND name = 'add'"
        " AND outcome = 'succeeded' ORDER BY occurrence DESC LIMIT 1) AS steps,"
        " (SELECT finished_at IS NOT NULL FROM instances WHERE id = %(id)s) AS done",
        {"id": instance_id},
    )
    row = await cursor.fetchone()
    return (int(row["steps"] or 0), bool(row["done"])) if row else (0, False)


async def _start(bench: Bench, instance_id: str, steps: int) -> None:
    async with Producer(bench.iso.amqp_url) as producer:
        await producer.start(bench_chain, Chain(n=0, steps=steps), instance_id=instance_id)


async def _wait_done(bench: Bench, instance_id: str, procs: list[Proc], sampler: Sampler | None) -> None:
    """Poll until the instance finished; sample progress and CPU; raise if it stalls or a worker died."""
    async with bench.connection() as conn:
        await _poll_done(bench, conn, instance_id, procs, sampler)


async def _poll_done(
    bench: Bench, conn: Conn, instance_id: str, procs: list[Proc], sampler: Sampler | None
) -> None:
    last, changed = -1, time.monotonic()
    while True:
        committed, done = await _progress(conn, instance_id)
        if sampler is not None:
            sampler.samples.append((committed, sum(cpu_seconds(p.pid) for p in procs), time.monotonic()))
        if done:
            return
        if committed != last:
            last, changed = committed, time.monotonic()
        elif time.monotonic() - changed > STALL_S:
            raise RuntimeError(f"{instance_id}: no step committed for {STALL_S:.0f}s at {committed}")
        bench.check_alive(procs)
        await asyncio.sleep(SAMPLE_S)


async def _windows(bench: Bench, steps: int) -> dict[str, Any]:
    await bench.reset(f"long chain of {steps:,} steps")
    instance_id = "lc-000000"
    procs = await bench.start_workers("lc", 1)
    task = bench.progress.add_task(f"long chain: 1 x {steps:,} steps", total=None)
    sampler = Sampler()
    try:
        stats_before = await bench.db_stats()
        cpu_before = cpu_seconds(procs[0].pid)
        sampler.samples.append((0, cpu_before, time.monotonic()))
        await _start(bench, instance_id, steps)
        await _wait_done(bench, instance_id, procs, sampler)
        cpu = cpu_seconds(procs[0].pid) - cpu_before
    finally:
        bench.fleet.stop(procs)
        bench.progress.remove_task(task)
    stats_after = await bench.db_stats()
    check = await bench.check_instances("lc-", [instance_id], lambda _: expected_count(0, steps))
    if not check.ok:
        bench.problem(f"long chain: {check.describe()}")
    rows = await bench.rows(
        "SELECT occurrence, started_at, finished_at FROM step_attempts"
        " WHERE instance_id = %s AND outcome = 'succeeded' ORDER BY occurrence",
        instance_id,
    )
    ends = [rows[0]["started_at"].timestamp()] + [row["finished_at"].timestamp() for row in rows]
    windows = []
    for first in range(0, len(rows) - WINDOW + 1, WINDOW):
        end = first + WINDOW
        cpu_window = sampler.cpu_at(end) - sampler.cpu_at(first)
        windows.append(
            {
                "first_step": first + 1,
                "last_step": end,
                "wall_s": ends[end] - ends[first],
                "worker_cpu_ms_per_step": 1000.0 * cpu_window / WINDOW,
            }
        )
    db = {name: (stats_after[name] - stats_before[name]) / max(len(rows), 1) for name in stats_after}
    head, tail = windows[0], windows[-1]
    return {
        "instance_id": instance_id,
        "steps": len(rows),
        "attempts": int(
            await bench.scalar("SELECT count(*) FROM step_attempts WHERE instance_id = %s", instance_id)
        ),
        "elapsed_s": ends[-1] - ends[0],
        "worker_cpu_ms_per_step": 1000.0 * cpu / max(len(rows), 1),
        "db_per_step": db,
        "windows": windows,
        "wall_ratio": tail["wall_s"] / head["wall_s"],
        "cpu_ratio": tail["worker_cpu_ms_per_step"] / head["worker_cpu_ms_per_step"],
        "check_ok": check.ok,
        "check": check.describe(),
    }


async def _kill(bench: Bench, steps: int) -> dict[str, Any]:
    """SIGKILL the only worker half-way, start a replacement at once; time the next committed step."""
    await bench.reset(f"long chain of {steps:,} steps, worker killed half-way")
    instance_id = "lk-000000"
    procs = await bench.start_workers("lk", 1)
    task = bench.progress.add_task(f"long chain: SIGKILL at {steps // 2:,} of {steps:,}", total=None)
    try:
        async with bench.connection() as conn:
            await _start(bench, instance_id, steps)
            while (await _progress(conn, instance_id))[0] < steps // 2:
                bench.check_alive(procs)
                await asyncio.sleep(0.01)
            killed = _kill_one(bench, procs[0])
            procs = [bench.fleet.worker("lk-w2")]  # the replacement, at once
            figures = await _next_step(bench, conn, instance_id, procs[0], killed)
            await _poll_done(bench, conn, instance_id, procs, None)
    finally:
        bench.fleet.stop(procs)
        bench.progress.remove_task(task)
    check = await bench.check_instances("lk-", [instance_id], lambda _: expected_count(0, steps))
    counts = (
        await bench.rows(
            "SELECT count(*) AS steps, count(DISTINCT occurrence) AS distinct_steps FROM step_attempts"
            " WHERE instance_id = %s AND outcome = 'succeeded'",
            instance_id,
        )
    )[0]
    once = counts["steps"] == counts["distinct_steps"] == steps
    if not (check.ok and once):
        bench.problem(f"long chain, worker killed: {check.describe()}; {counts['steps']} commits of {steps}")
    log = procs[0].log()
    return {
        **figures,
        "kill_to_republished_s": _logged_after(log, "event=outbox_swept", figures["killed_wall"]),
        "kill_to_taken_over_s": _logged_after(log, "event=outbox_taken_over", figures["killed_wall"]),
        "swept": log.count("event=outbox_swept"),
        "stale_dropped": log.count("event=stale_message"),
        "committed_once": once,
        "check_ok": check.ok and once,
    }


def _logged_after(log: str, event: str, since: float) -> float:
    """Seconds from ``since`` (wall clock) to the first log line with ``event``; NaN if none.

    The workers' log lines start with their local time to the millisecond.
    """
    for line in log.splitlines():
        if event in line:
            logged = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")  # noqa: DTZ007  local, as logged
            return logged.timestamp() - since
    return math.nan


def _kill_one(bench: Bench, proc: Proc) -> tuple[float, float]:
    """SIGKILL ``proc`` by its pid; the driver's monotonic and wall clocks at the kill."""
    os.kill(proc.pid, signal.SIGKILL)
    killed = time.monotonic(), time.time()
    proc.popen.wait(timeout=10)
    bench.fleet.procs.remove(proc)
    return killed


async def _next_step(
    bench: Bench, conn: Conn, instance_id: str, replacement: Proc, clocks: tuple[float, float]
) -> dict[str, Any]:
    """Seconds from the kill until the replacement was ready, and until the next step committed."""
    killed, killed_wall = clocks
    await asyncio.sleep(SETTLE_S)
    at_kill, _ = await _progress(conn, instance_id)
    ready_s = math.nan
    while (committed := (await _progress(conn, instance_id))[0]) <= at_kill:
        if math.isnan(ready_s) and WORKER_READY in replacement.log():
            ready_s = time.monotonic() - killed
        if time.monotonic() - killed > STALL_S:
            raise RuntimeError(f"{instance_id}: no step committed within {STALL_S:.0f}s of the kill")
        bench.check_alive([replacement])
        await asyncio.sleep(0.02)
    next_step_s = time.monotonic() - killed
    return {
        "killed_at_step": at_kill,
        "killed_wall": killed_wall,
        "kill_to_replacement_ready_s": next_step_s if math.isnan(ready_s) else ready_s,
        "kill_to_next_step_s": next_step_s,
        "next_step": committed,
    }


async def _replay(bench: Bench, instance_id: str) -> dict[str, Any]:
    """Read the finished chain's history as a worker does, replay it, and weigh it in memory."""
    store = create_store(bench.iso.database_url)
    try:
        loads = []
        for _ in range(3):
            began = time.perf_counter()
            history = await store.load_history(instance_id)
            loads.append(time.perf_counter() - began)
        assert history is not None
        replays = []
        for _ in range(3):
            began = time.perf_counter()
            with Replay(bench_chain, history) as replay:
                outcome = replay.start()
            replays.append(time.perf_counter() - began)
        if outcome.kind != "returned":
            bench.problem(f"long chain replay: {outcome.kind} ({outcome.error})")
        del history
        tracemalloc.start()
        try:
            weighed = await store.load_history(instance_id)
            history_bytes, _ = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert weighed is not None
        size = len(weighed.steps)
    finally:
        await store.close()
    return {
        "steps": size,
        "load_ms": 1000.0 * statistics.median(loads),
        "replay_ms": 1000.0 * statistics.median(replays),
        "history_mib": history_bytes / 2**20,
        "bytes_per_step": history_bytes / max(size, 1),
    }


def targets(long: dict[str, Any]) -> list[dict[str, Any]]:
    """The big chain's rows of the target table."""
    chain = long.get("chain")
    if not chain:
        return []
    windows, kill = chain["windows"], chain["kill"]
    ratio = windows["wall_ratio"]
    return [
        {
            "target": f"{chain['steps']:,}-step workflow: last {WINDOW:,} steps within"
            f" {WINDOW_RATIO_LIMIT}x of the first (issue 23)",
            "measured": f"{ratio:.2f}x (worker CPU {windows['cpu_ratio']:.2f}x)",
            "met": ratio <= WINDOW_RATIO_LIMIT and windows["check_ok"],
        },
        {
            "target": f"worker SIGKILLed at step {kill['killed_at_step']:,}, replaced:"
            f" next step within {KILL_LIMIT_S:.0f} s (issue 23)",
            "measured": f"{kill['kill_to_next_step_s']:.2f} s",
            "met": kill["kill_to_next_step_s"] <= KILL_LIMIT_S and kill["check_ok"],
        },
    ]


def checks(long: dict[str, Any]) -> list[tuple[str, bool]]:
    """Whether both chains completed with the right output, each step committed once."""
    chain = long.get("chain")
    if not chain:
        return []
    return [("long/chain", chain["windows"]["check_ok"]), ("long/killed", chain["kill"]["check_ok"])]


def render(console: Console, long: dict[str, Any]) -> None:
    """Windows, the kill and the replay, one table each."""
    chain = long.get("chain")
    if not chain:
        return
    windows, kill, replay = chain["windows"], chain["kill"], chain["replay"]
    db = windows["db_per_step"]
    console.print(
        f"\n[bold]4. Long workflows: 1 x {chain['steps']:,} steps, 1 worker,"
        f" per {WINDOW:,}-step window[/] ({windows['elapsed_s']:.1f} s, worker CPU"
        f" {windows['worker_cpu_ms_per_step']:.2f} ms/step, {db.get('xact_commit', math.nan):.2f}"
        f" commits and {db.get('tup_fetched', math.nan):.1f} rows read per step)"
    )
    table = Table()
    for name in ("steps", "wall s", "wall ms/step", "worker CPU ms/step"):
        table.add_column(name, justify="right")
    for window in windows["windows"]:
        table.add_row(
            f"{window['first_step']:,}-{window['last_step']:,}",
            f"{window['wall_s']:.2f}",
            f"{1000.0 * window['wall_s'] / WINDOW:.2f}",
            _f(window["worker_cpu_ms_per_step"], 2),
        )
    table.caption = f"last / first: wall {windows['wall_ratio']:.2f}x, worker CPU {windows['cpu_ratio']:.2f}x"
    console.print(table)
    console.print(
        f"worker SIGKILLed at step {kill['killed_at_step']:,}, replacement started at once: ready after"
        f" {kill['kill_to_replacement_ready_s']:.2f} s, next step committed after"
        f" {kill['kill_to_next_step_s']:.2f} s (its message taken over on the redelivery after"
        f" {kill.get('kill_to_taken_over_s', math.nan):.2f} s, republished by a sweep after"
        f" {kill.get('kill_to_republished_s', math.nan):.2f} s),"
        f" {kill.get('stale_dropped', 0)} duplicate messages dropped;"
        f" every step committed once: {'yes' if kill['committed_once'] else 'NO'}"
    )
    console.print(
        f"the {replay['steps']:,}-step history: load_history {replay['load_ms']:.0f} ms,"
        f" replay from the start"
        f" {replay['replay_ms']:.0f} ms, {replay['history_mib']:.1f} MiB in memory"
        f" ({replay['bytes_per_step']:.0f} bytes a step)"
    )


def _f(value: Any, digits: int) -> str:
    return f"{value:,.{digits}f}" if isinstance(value, float) and math.isfinite(value) else "-"
