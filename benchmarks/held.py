"""The held section: many instances sleeping and waiting for an event at once, then the sleeps fall due.

Issue 23, item 2: ``held_instances`` instances of ``bench-nap`` sleep (armed a day ahead)
and as many of ``bench-await`` wait for an event nobody sends, on 2 workers and 2
schedulers. The first ``held_started`` of each are started through the engine
(``Producer.start_batch``, a thousand at a time; on a busy 2-core machine about 60 a
second, so 200,000 would take most of an hour); the rest are copies of the rows the
engine wrote for instance 0 of each kind (``CLONE_SQL``). Each worker's RSS is taken
idle, once half the engine's share is held (about a replay cache's worth per worker:
the cache is full), once all of it is held, and once the copies are in: a worker that
keeps no state per held instance beyond that bounded cache does not grow from the
second to the last. (The copies never passed through a worker, so they cost it
nothing until they wake; the RSS once every sleep has resumed is shown too.) Then the sleeps
are made due evenly over ``held_spread_s`` seconds (their timers' and sleep steps'
``fire_at`` moved, as the timers section does), and the figure is how late each instance
resumed: its next step committed, minus its due time.
"""

from __future__ import annotations

import math
import time
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table

from benchmarks.backlog import TARGET_P99_MS, lateness_table, make_due, nap_outcome, until_armed
from benchmarks.procs import rss_kib
from benchmarks.workflows import Alarm, Job, bench_await, bench_nap
from stepline import Producer

if TYPE_CHECKING:
    from benchmarks.procs import Proc
    from benchmarks.sections import Bench

TARGET_GROWTH_PCT = 10.0
"""Issue 23, item 2: the workers' RSS does not grow with the held instances (bound, noise allowed)."""
CLONE_SQL = (
    """
INSERT INTO instances
SELECT (jsonb_populate_record(t, jsonb_build_object(
    'id', %(prefix)s || lpad(g.i::text, 6, '0'),
    'params', jsonb_set(t.params, '{n}', to_jsonb(g.i)),
    'trace_context', jsonb_build_object('traceparent',
        '00-' || md5(%(prefix)s || g.i) || '-' || left(md5('span' || %(prefix)s || g.i), 16) || '-01')))).*
FROM instances t CROSS JOIN generate_series(%(first)s::int, %(last)s::int) AS g(i)
WHERE t.id = %(template)s
""",
    """
INSERT INTO steps
SELECT (jsonb_populate_record(t, jsonb_build_object('instance_id', %(prefix)s || lpad(g.i::text, 6, '0')))).*
FROM steps t CROSS JOIN generate_series(%(first)s::int, %(last)s::int) AS g(i)
WHERE t.instance_id = %(template)s
""",
    """
INSERT INTO timers (instance_id, step, occurrence, attempt, kind, fire_at, routing_key, body, headers,
                    created_at)
SELECT i.id, t.step, t.occurrence, t.attempt, t.kind, t.fire_at, t.routing_key,
       convert_to(replace(convert_from(t.body, 'UTF8'), t.instance_id, i.id), 'UTF8'),
       i.trace_context, t.created_at
FROM timers t JOIN instances i ON i.id LIKE %(prefix)s || '%%'
 AND substr(i.id, 4)::int BETWEEN %(first)s AND %(last)s
WHERE t.instance_id = %(template)s
""",
)
"""Copies of an instance the engine held (its instance, step and timer rows), for instances
``first`` to ``last`` under ``prefix``: the same rows with their id, params' ``n`` and trace id
replaced (the timer's message body names its instance; its headers carry the trace)."""
WAITING_SQL = "SELECT count(*) AS n FROM steps WHERE instance_id LIKE %s AND kind = 'event'"
"""How many instances under a prefix are suspended on their event wait."""


async def run(bench: Bench) -> dict[str, Any]:
    """Hold ``held_instances`` sleepers and as many event waiters; then wake the sleepers, spread out."""
    count, spread_s = bench.sizes.held_instances, bench.sizes.held_spread_s
    engine = min(count, bench.sizes.held_started)
    await bench.reset("held instances")
    far = datetime.now(UTC) + timedelta(days=1)
    sleeper_ids = [f"hs-{index:06d}" for index in range(count)]
    waiter_ids = [f"hw-{index:06d}" for index in range(count)]
    workers = await bench.start_workers("hd", 2)
    schedulers, _ = await bench.start_noting_schedulers("hd", 2)
    procs = [*workers, *schedulers]
    holding = bench.progress.add_task(f"held: arming {count:,} sleeps and {count:,} waits", total=2 * count)
    resuming = bench.progress.add_task(
        f"held: {count:,} sleeps due over {spread_s:g} s, resumed", total=count
    )
    rss: dict[str, list[int]] = {"idle": _rss(workers)}
    try:
        started = time.monotonic()
        async with Producer(bench.iso.amqp_url) as producer:
            for label, part in (("baseline", slice(0, engine // 2)), ("started", slice(engine // 2, engine))):
                await _hold(bench, producer, sleeper_ids[part], waiter_ids[part], far, procs)
                bench.progress.update(holding, completed=2 * part.stop)
                rss[label] = _rss(workers)
        engine_s = time.monotonic() - started
        if engine < count:
            async with bench.connection() as conn, conn.transaction():
                for prefix in ("hs-", "hw-"):
                    values = {
                        "prefix": prefix,
                        "template": f"{prefix}000000",
                        "first": engine,
                        "last": count - 1,
                    }
                    for sql in CLONE_SQL:
                        await conn.execute(sql, values)
            await until_armed(bench, "hs-", count, procs)
            await until_armed(bench, "hw-", count, procs, sql=WAITING_SQL)
        bench.progress.update(holding, completed=2 * count)
        rss["held"] = _rss(workers)
        holding_s = time.monotonic() - started
        await make_due(bench, "hs-", count, spread_s)
        await bench.wait_finished("hs-", count, resuming, procs)
        rss["resumed"] = _rss(workers)
        still_waiting = int(
            await bench.scalar(
                "SELECT count(*) FROM instances WHERE id LIKE %s AND status = 'waiting'", "hw-%"
            )
        )
    finally:
        bench.fleet.stop(procs)
        bench.progress.remove_task(holding)
        bench.progress.remove_task(resuming)
    figures, resumed = await nap_outcome(bench, "held", "hs-", sleeper_ids)
    result: dict[str, Any] = {
        "sleeping": count,
        "waiting": count,
        "workers": 2,
        "schedulers": 2,
        "started_through_engine": engine,
        "engine_s": engine_s,
        "holding_s": holding_s,
        "rss_kib": rss,
        "rss_growth_pct": growth_pct(rss["baseline"], rss["held"]),
        "waiters_still_waiting": still_waiting,
        "spread_s": spread_s,
        "resumed": len(resumed),
        **figures,
    }
    bench.note(
        f"held: {count:,} sleeping + {count:,} waiting, worker RSS growth {result['rss_growth_pct']:.1f}%;"
        f" {len(resumed):,} resumed over {spread_s:g} s, p99 {result['resume_lateness']['p99_ms']:.0f} ms"
    )
    return result


async def _hold(
    bench: Bench,
    producer: Producer,
    sleepers: list[str],
    waiters: list[str],
    far: datetime,
    procs: list[Proc],
) -> None:
    """Start these sleepers and waiters; return once every one of them is suspended."""
    from benchmarks.sections import start_all

    def number(instance_id: str) -> int:
        return int(instance_id[3:])

    await start_all(producer, bench_nap, [Alarm(n=number(i), due=far) for i in sleepers], sleepers)
    await start_all(producer, bench_await, [Job(n=number(i)) for i in waiters], waiters)
    await until_armed(bench, "hs-", number(sleepers[-1]) + 1, procs)
    await until_armed(bench, "hw-", number(waiters[-1]) + 1, procs, sql=WAITING_SQL)


def _rss(workers: list[Proc]) -> list[int]:
    return [rss_kib(proc.pid) for proc in workers]


def growth_pct(before: list[int], after: list[int]) -> float:
    """The largest growth of any worker's RSS from ``before`` to ``after``, in percent."""
    return max(
        (100.0 * (end - start) / start for start, end in zip(before, after, strict=True) if start),
        default=math.nan,
    )


def targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 23, item 2: held instances cost the workers no memory, and the sleeps resume on time."""
    sleeping, waiting = result["sleeping"], result["waiting"]
    growth = result["rss_growth_pct"]
    held_mib = [kib / 1024 for kib in result["rss_kib"]["held"]]
    p99 = result["resume_lateness"]["p99_ms"]
    resumed = result["resumed"]
    return [
        {
            "target": f"{sleeping:,} sleeping + {waiting:,} waiting: worker RSS growth"
            f" < {TARGET_GROWTH_PCT:g}% past a full replay cache",
            "measured": f"{growth:+.1f}% (held: {', '.join(f'{mib:.0f}' for mib in held_mib)} MiB)",
            "met": math.isfinite(growth) and growth < TARGET_GROWTH_PCT,
        },
        {
            "target": f"{sleeping:,} sleeps due over {result['spread_s']:g} s resume, lateness p99 < 2 s",
            "measured": f"{p99:,.0f} ms, {resumed:,} of {sleeping:,} resumed",
            "met": resumed == sleeping and math.isfinite(p99) and p99 < TARGET_P99_MS,
        },
    ]


def render(console: Console, result: dict[str, Any]) -> None:
    """The section's tables: each worker's RSS as the instances were held, and the resume lateness."""
    console.print(
        f"\n[bold]Held: {result['sleeping']:,} sleeping + {result['waiting']:,} waiting for an event"
        f" ({result['started_through_engine']:,} of each started through the engine in"
        f" {result['engine_s']:.0f} s, the rest copies of their rows), 2 workers[/]"
    )
    memory = Table()
    memory.add_column("worker")
    engine = result["started_through_engine"]
    for label in ("idle", f"{engine // 2:,} x 2 held", f"{engine:,} x 2 held", "all held", "sleeps resumed"):
        memory.add_column(label, justify="right")
    rss = result["rss_kib"]
    for index in range(len(rss["idle"])):
        figures = (rss[key][index] / 1024 for key in ("idle", "baseline", "started", "held", "resumed"))
        memory.add_row(f"w{index + 1}", *(f"{mib:,.0f} MiB" for mib in figures))
    console.print(memory)
    console.print(
        lateness_table(result, f"{result['resumed']:,} sleeps due evenly over {result['spread_s']:g} s")
    )
