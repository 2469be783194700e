"""``python -m benchmarks [--quick] [--only NAME ...]``: run the benchmark, print tables, write JSON."""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn

import psycopg
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)

from benchmarks import (
    backlog,
    bigdb_bench,
    cli_speed,
    dashboard_pages,
    fanout,
    flow,
    held,
    long_flows,
    report,
    starts,
)
from benchmarks.isolation import Isolation
from benchmarks.procs import ROOT, Fleet, child_env, machine_busy_seconds
from benchmarks.sections import FULL, QUICK, Bench, Sizes

SECTIONS = (
    "throughput",
    "latency",
    "timers",
    "starts",
    "backlog",
    "held",
    "long",
    "naive",
    "rawtx",
    "replaycheck",
    "fanout",
    "flow",
    "bigdb",
    "cli",
)
ALIASES = {"memory": ("throughput",), "references": ("naive", "rawtx")}
OPT_IN = ("held",)
"""Sections only ``--only`` runs: the held section's full size (200,000 instances started, their
sleeps due over 5 minutes) does not fit in the full run's 15 minutes."""


def parse_sections(given: list[str] | None) -> set[str]:
    """The sections to run from ``--only`` values (repeatable, comma-separated); all by default."""
    if not given:
        return set(SECTIONS) - set(OPT_IN)
    chosen: set[str] = set()
    for item in given:
        for name in filter(None, (part.strip() for part in item.split(","))):
            if name in ALIASES:
                chosen.update(ALIASES[name])
            elif name in SECTIONS:
                chosen.add(name)
            else:
                names = ", ".join((*SECTIONS, *ALIASES))
                raise SystemExit(f"python -m benchmarks: unknown section {name!r} (one of: {names})")
    return chosen


def machine() -> dict[str, Any]:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "host": socket.gethostname(),
        "cpus": len(os.sched_getaffinity(0)),
        "cpu_model": model,
        "python": platform.python_version(),
        "commit": _commit(),
    }


def background_cores(seconds: float = 2.0) -> float:
    """How many cores other work keeps busy before the run starts (this machine may be shared)."""
    before = machine_busy_seconds()
    time.sleep(seconds)
    return (machine_busy_seconds() - before) / seconds


def _commit() -> str:
    if shutil.which("git") is None:
        return "unknown"
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    if head.returncode != 0:
        return "unknown"
    dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True)
    return head.stdout.strip() + ("+local changes" if dirty.stdout.strip() else "")


async def run_sections(bench: Bench, sections: set[str], results: dict[str, Any]) -> None:
    """Run what was asked, references next to the engine runs they are compared with."""

    async def guarded(name: str, action: Callable[[], Awaitable[Any]]) -> Any:
        try:
            return await action()
        except Exception as exc:  # one broken section must not hide the others
            bench.problem(f"{name} failed: {type(exc).__name__}: {exc}")
            bench.fleet.stop_all()
            return None

    # SIGTERM cancels the run like Ctrl-C does: every finally stops its processes on the way out.
    main_task = asyncio.current_task()
    assert main_task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main_task.cancel)
    await bench.setup()
    if "rawtx" in sections:
        results["rawtx"] = await guarded("raw transaction", bench.rawtx)
    for count in bench.sizes.worker_counts:
        if "naive" in sections:
            naive_run = await guarded(f"naive loop {count}", functools.partial(bench.naive_run, count))
            if naive_run is not None:
                bench.naive[count] = naive_run
                results.setdefault("naive", {"runs": []})["runs"].append(asdict(naive_run))
        if "throughput" in sections:
            engine_run = await guarded(f"throughput {count}", functools.partial(bench.throughput_run, count))
            if engine_run is not None:
                bench.throughput[count] = engine_run
                entry = results.setdefault("throughput", {"instances": bench.sizes.instances, "runs": []})
                entry["runs"].append(engine_run.as_json())
    elsewhere = {  # sections in modules of their own
        "long": functools.partial(_long, bench),
        "fanout": functools.partial(fanout.run, bench),
        "flow": functools.partial(flow.run, bench),
        "backlog": functools.partial(backlog.run, bench),
        "starts": functools.partial(starts.run, bench),
        "held": functools.partial(held.run, bench),
        "bigdb": functools.partial(_bigdb, bench),
        "cli": functools.partial(cli_speed.run, bench),
    }
    for name in (
        "latency",
        "timers",
        "starts",
        "backlog",
        "held",
        "long",
        "replaycheck",
        "fanout",
        "flow",
        "bigdb",
        "cli",
    ):
        if name in sections:
            outcome = await guarded(name, elsewhere.get(name) or getattr(bench, name))
            if outcome is not None:
                results[name] = outcome
    await guarded("purging the queues", bench.purge_queues)  # counts what the last run left
    results["left_in_queues"] = bench.left_in_queues


async def _long(bench: Bench) -> dict[str, Any]:
    """The 1,000- against 10-step comparison (issue 6), then the long chain (issue 23)."""
    result = await bench.long()
    result["chain"] = await long_flows.run(bench)
    return result


async def _bigdb(bench: Bench) -> dict[str, Any]:
    """The big-database section, on a database of its own beside the run's."""
    samples = bench.sizes.bigdb_samples

    async def dashboard(database_url: str) -> list[bigdb_bench.Timing]:
        return await dashboard_pages.serve_and_time(database_url, bench.iso.amqp_url, samples)

    async def workload(database_url: str | None, label: str) -> dict[str, Any]:
        on = bench
        if database_url is not None:
            on = bench.on_database(database_url)
            await on.read_collation()
        return (await on.throughput_run(BIGDB_WORKERS, label=label)).as_json()

    options = bigdb_bench.Options(
        instances=bench.sizes.bigdb_instances,
        samples=samples,
        keep=bench.keep_bigdb,
        dashboard=dashboard,
        workload=workload,
    )
    return await bigdb_bench.run(bench.iso.database_url, options, bench.console.print)


BIGDB_WORKERS = 2
"""Workers of the throughput workload in the big-database section (about 18 connections each)."""


def _interrupt(*_: object) -> NoReturn:
    raise KeyboardInterrupt


def _setting(parser: argparse.ArgumentParser, item: str) -> tuple[str, str]:
    name, equals, value = item.partition("=")
    if (
        not equals
        or not name.startswith("STEPLINE_")
        or name in ("STEPLINE_DATABASE_URL", "STEPLINE_AMQP_URL")
    ):
        parser.error(f"--set takes STEPLINE_NAME=VALUE (not the URLs, which the run sets), got {item!r}")
    return name, value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Benchmark Stepline on the local PostgreSQL and RabbitMQ (own database and vhost).",
    )
    parser.add_argument(
        "--quick", action="store_true", help="small sizes: about 3 minutes, to check it works"
    )
    parser.add_argument(
        "--only",
        action="append",
        metavar="NAME",
        help=f"run only these sections (repeatable or comma-separated): {', '.join((*SECTIONS, *ALIASES))}",
    )
    parser.add_argument(
        "--keep-logs", action="store_true", help="keep the worker logs even when all went well"
    )
    parser.add_argument(
        "--keep-database",
        action="store_true",
        help="do not drop the database and vhost at the end (to look at the rows of the last run)",
    )
    parser.add_argument(
        "--keep-bigdb",
        action="store_true",
        help="do not drop the big-database section's database at the end (its URL is printed)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a STEPLINE_* setting for the workers and schedulers (repeatable), to measure a change "
        "against the defaults, e.g. --set STEPLINE_WORKER__REPLAY_CACHE_SIZE=0",
    )
    args = parser.parse_args(argv)
    overrides = dict(_setting(parser, item) for item in args.set)
    sections = parse_sections(args.only)
    sizes: Sizes = QUICK if args.quick else FULL
    started = datetime.now(UTC)
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    console = Console()
    if not console.is_terminal:
        console = Console(width=130)  # piped to a file: wide enough that the tables do not wrap
    iso = Isolation.new()
    log_dir = Path(tempfile.mkdtemp(prefix="stepline-bench-"))
    fleet = Fleet({**child_env(iso.database_url, iso.amqp_url), **overrides}, log_dir)
    results: dict[str, Any] = {
        "meta": {
            "started": started.isoformat(timespec="seconds"),
            "mode": "quick" if args.quick else "full",
            "sections": sorted(sections),
            "sizes": asdict(sizes),
            "settings": overrides,
            **machine(),
            "postgresql": "unknown",
            "load_average": os.getloadavg(),
        }
    }
    signal.signal(signal.SIGTERM, _interrupt)
    interrupted = False
    began = time.monotonic()
    bench: Bench | None = None
    try:
        console.print(f"benchmarks: database {iso.database}, vhost {iso.vhost}, logs in {log_dir}")
        idle = background_cores()
        results["meta"]["background_cpu_cores"] = round(idle, 2)
        if idle > 0.25:
            console.print(
                f"[yellow]warning:[/] {idle:.2f} cores are busy with other work; the figures will be lower"
            )
        iso.create()
        with psycopg.connect(iso.database_url) as conn:
            row = conn.execute("SHOW server_version").fetchone()
            results["meta"]["postgresql"] = row[0].split()[0] if row else "unknown"
        progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
        )
        with progress:
            bench = Bench(iso, sizes, fleet, console, progress)
            bench.keep_bigdb = args.keep_bigdb
            try:
                asyncio.run(run_sections(bench, sections, results))
            finally:
                signal.signal(signal.SIGTERM, _interrupt)  # closing the loop reset it
    except (KeyboardInterrupt, asyncio.CancelledError):
        interrupted = True
        console.print("[bold red]interrupted[/]: stopping processes, dropping the database and vhost")
    finally:
        fleet.stop_all()
        if args.keep_database:
            console.print(f"kept database {iso.database} and vhost {iso.vhost}")
        else:
            iso.drop()
    results["meta"]["duration_s"] = round(time.monotonic() - began, 1)
    results["meta"]["interrupted"] = interrupted
    results["problems"] = bench.problems if bench else []
    results["targets"] = report.targets(results)
    report.render(console, results)
    path = report.write(results, stamp)
    console.print(f"\nresults: {path.relative_to(ROOT)}  ({results['meta']['duration_s']:.0f}s)")
    failed = interrupted or bool(results["problems"])
    if failed:
        console.print(f"worker and scheduler logs kept in {log_dir}")
    elif not args.keep_logs:
        shutil.rmtree(log_dir, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
