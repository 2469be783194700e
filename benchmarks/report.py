"""Turn the results into tables, target verdicts and a JSON file."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from benchmarks import backlog, bigdb_bench, cli_speed, fanout, flow, held, long_flows, starts

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def _f(value: Any, digits: int = 0, suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:,.{digits}f}{suffix}"


def _mib(kib: list[int]) -> str:
    return " / ".join(f"{value / 1024:.0f}" for value in kib) or "-"


DB_COLUMNS = ("xact_commit", "xact_rollback", "tup_inserted", "tup_updated", "tup_deleted")


def _section(console: Console, heading: str) -> Table:
    """Print a section's heading on its own line (a table title would wrap) and return its table."""
    console.print(f"\n[bold]{heading}[/]")
    return Table()


_SECTION_TARGETS: tuple[tuple[str, Callable[[dict[str, Any]], list[dict[str, Any]]]], ...] = (
    ("starts", starts.targets),
    ("backlog", backlog.targets),
    ("held", held.targets),
    ("fanout", fanout.targets),
    ("bigdb", bigdb_bench.targets),
    ("cli", cli_speed.targets),
)
"""Sections whose module states its own targets, in the order the table shows them."""


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, each with what this run measured and a verdict (None: not measured)."""
    rows: list[dict[str, Any]] = []
    engine = {run["workers"]: run for run in results.get("throughput", {}).get("runs", [])}
    naive = {run["processes"]: run for run in results.get("naive", {}).get("runs", [])}
    if 2 in engine and 2 in naive:
        rows.extend(_chain_targets(engine[2], naive[2]))
    latency = results.get("latency")
    if latency:
        p99 = latency["step_to_next_step"]["p99_ms"]
        rows.append(
            {
                "target": "p99 step-to-next-step < 20 ms at half load",
                "measured": f"{p99:.1f} ms",
                "met": p99 < 20.0,
            }
        )
    timers = results.get("timers")
    if timers:
        for run in (timers.get("spread"), timers):
            if run is None:
                continue
            p99 = run["fire_lateness"]["p99_ms"]
            rows.append(
                {
                    "target": f"timer fire lateness p99 < 100 ms ({run['timers']:,} due {_due(run)})",
                    "measured": f"{p99:.0f} ms",
                    "met": p99 < 100.0,
                }
            )
        rows.extend(_resume_targets(timers, engine.get(2)))
    long = results.get("long")
    if long:
        ratio = long["wall_ms_per_step"]["ratio"]
        rows.append(
            {
                "target": "1,000-step per-step cost within 2x of 10-step",
                "measured": f"{ratio:.2f}x (CPU: worker {long['worker_cpu_ms_per_step']['ratio']:.2f}x)",
                "met": ratio <= 2.0,
            }
        )
        rows.extend(long_flows.targets(long))
    runs = results.get("throughput", {}).get("runs", [])
    if runs:
        growth = max(run["rss_growth_pct"] for run in runs)
        rows.append(
            {
                "target": "worker RSS growth < 10% across the throughput run",
                "measured": f"{growth:.1f}% (largest, any worker)",
                "met": growth < 10.0,
            }
        )
    for name, section_targets in _SECTION_TARGETS:
        if results.get(name):
            rows.extend(section_targets(results[name]))
    checks = _all_checks(results)
    if checks:
        bad = [name for name, ok in checks if not ok]
        rows.append(
            {
                "target": "every instance complete with the right output",
                "measured": "all runs" if not bad else "failed in: " + ", ".join(bad),
                "met": not bad,
            }
        )
    return rows


def _chain_targets(engine: dict[str, Any], naive: dict[str, Any]) -> list[dict[str, Any]]:
    """The throughput workload (chains of 10 steps) with 2 workers against the naive loop with 2 processes."""
    ratio = engine["steps_per_s"] / naive["steps_per_s"]
    measured = f"{ratio:.2f}x ({engine['steps_per_s']:.0f} vs {naive['steps_per_s']:.0f})"
    return [
        {
            "target": "steps/s, 2 workers >= 1.0x naive loop, 2 processes",
            "measured": measured,
            "met": ratio >= 1.0,
        },
        {
            "target": "steps/s, 2 workers >= 2.0x naive loop (issue 23 item 6)",
            "measured": measured,
            "met": ratio >= 2.0,
        },
    ]


def _resume_targets(timers: dict[str, Any], throughput: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Issue 23, item 7: when the workflows resume (the step after the sleep committed), not only fire."""
    rows: list[dict[str, Any]] = []
    resume = timers.get("resume") or (timers if timers["timers"] == 1_000 else None)
    if resume is not None and "resume_lateness" in resume:
        p99 = resume["resume_lateness"]["p99_ms"]
        rows.append(
            {
                "target": f"resume lateness p99 < 500 ms ({resume['timers']:,} due at one instant)",
                "measured": f"{p99:.0f} ms",
                "met": p99 < 500.0,
            }
        )
    rate = timers.get("resumed_per_s")
    if rate is not None and throughput is not None and math.isfinite(rate):
        ratio = rate / throughput["steps_per_s"]
        rows.append(
            {
                "target": f"resumed/s >= 0.8x steps/s, 2 workers ({timers['timers']:,} due at one instant)",
                "measured": f"{ratio:.2f}x ({rate:.0f} vs {throughput['steps_per_s']:.0f})",
                "met": ratio >= 0.8,
            }
        )
    return rows


def _due(run: dict[str, Any]) -> str:
    """How a timers run's sleeps fell due."""
    spread = float(run.get("spread_s") or 0.0)
    return "at one instant" if spread == 0 else f"evenly within {spread:g} s"


def _all_checks(results: dict[str, Any]) -> list[tuple[str, bool]]:
    found: list[tuple[str, bool]] = []
    for run in results.get("throughput", {}).get("runs", []):
        found.append((f"throughput {run['workers']}w", run["check"]["ok"]))
    for name in ("latency", "timers", "backlog", "held"):  # sections with one check of their own
        if name in results:
            found.append((name, results[name]["check"]["ok"]))
    for part in ("spread", "resume"):
        if part in results.get("timers", {}):
            found.append((f"timers {part}", results["timers"][part]["check"]["ok"]))
    if "long" in results:
        for part in ("long", "short"):
            found.append((f"long/{part}", results["long"][part]["check"]["ok"]))
        found.extend(long_flows.checks(results["long"]))
    if results.get("fanout"):
        found.extend(fanout.checks(results["fanout"]))
    if results.get("starts"):
        found.extend(starts.checks(results["starts"]))
    for run in results.get("naive", {}).get("runs", []):
        found.append((f"naive {run['processes']}p", run["complete"] == run["instances"]))
    return found


def render(console: Console, results: dict[str, Any]) -> None:
    """Print one table per section that ran, then the targets."""
    naive = {run["processes"]: run for run in results.get("naive", {}).get("runs", [])}
    throughput = results.get("throughput")
    _render_meta(console, results["meta"])
    if throughput:
        _render_throughput(console, throughput, naive)
    _render_references(console, naive, results.get("rawtx"))
    if results.get("latency"):
        _render_latency(console, results["latency"])
    _render_all_timers(console, results)
    if results.get("long"):
        _render_long(console, results["long"])
        long_flows.render(console, results["long"])
    if throughput:
        _render_memory(console, throughput)
    _render_db_work(console, throughput, naive)
    for name, module in (
        ("starts", starts),
        ("fanout", fanout),
        ("flow", flow),
        ("bigdb", bigdb_bench),
        ("cli", cli_speed),
    ):
        if results.get(name):
            module.render(console, results[name])
    if results.get("targets"):
        _render_targets(console, results["targets"])
    for problem in results.get("problems", []):
        console.print(f"[bold red]problem:[/] {problem}")


def _render_meta(console: Console, meta: dict[str, Any]) -> None:
    """The run's heading: when, where, on what, with which settings."""
    console.print(
        f"\n[bold]Stepline benchmark[/] ({meta['mode']} run) {meta['started']}  "
        f"{meta['cpus']} cores, {meta['cpu_model']}; PostgreSQL {meta['postgresql']}; commit {meta['commit']}"
    )
    if meta.get("settings"):
        console.print("settings: " + " ".join(f"{name}={value}" for name, value in meta["settings"].items()))
    if "background_cpu_cores" in meta:
        console.print(
            f"other work on the machine before the run: {meta['background_cpu_cores']:.2f} cores busy"
        )


def _render_throughput(console: Console, throughput: dict[str, Any], naive: dict[int, Any]) -> None:
    table = _section(
        console,
        (f"1. Throughput: {throughput['instances']:,} instances x 10 trivial steps, all started at once"),
    )
    for name in ("workers", "steps/s", "workflows/s", "naive steps/s", "vs naive", "worker CPU ms/step",
                 "machine CPU ms/step", "check"):  # fmt: skip
        table.add_column(name, justify="right" if name != "check" else "left")
    for run in throughput["runs"]:
        reference = naive.get(run["workers"])
        ratio = run["steps_per_s"] / reference["steps_per_s"] if reference else math.nan
        table.add_row(
            str(run["workers"]),
            _f(run["steps_per_s"]),
            _f(run["workflows_per_s"], 1),
            _f(reference["steps_per_s"]) if reference else "-",
            _f(ratio, 2, "x"),
            _f(run["worker_cpu_ms_per_step"], 2),
            _f(run["machine_cpu_ms_per_step"], 2),
            "ok" if run["check"]["ok"] else "FAILED",
        )
    console.print(table)


def _render_references(console: Console, naive: dict[int, Any], rawtx: dict[str, Any] | None) -> None:
    """The naive loop and raw transaction figures the engine is compared with (if they ran)."""
    if not naive and not rawtx:
        return
    references = Table()
    references.add_column("reference")
    references.add_column("rate", justify="right")
    references.add_column("machine CPU ms/step", justify="right")
    for processes, run in sorted(naive.items()):
        references.add_row(
            f"naive step loop, {processes} process(es),"
            f" {run['instances']:,} x {run['steps_per_instance']} steps",
            f"{_f(run['steps_per_s'])} steps/s",
            _f(run.get("machine_cpu_ms_per_step"), 2),
        )
    if rawtx:
        references.add_row(
            f"naive step transaction alone, {rawtx['clients']} clients (BEGIN, 3 statements, COMMIT)",
            f"{_f(rawtx['statements']['tx_per_s'])} tx/s",
        )
        references.add_row(
            f"the same writes as one statement, {rawtx['clients']} clients (1 round trip)",
            f"{_f(rawtx['one_statement']['tx_per_s'])} tx/s",
        )
    console.print("\n[bold]5. References, measured in the same run[/]")
    console.print(references)


def _render_latency(console: Console, latency: dict[str, Any]) -> None:
    table = _section(
        console,
        (
            f"2. Latency: 2 workers, open-loop {latency['rate_workflows_per_s']:.1f} workflows/s "
            f"({latency['rate_steps_per_s']:.0f} steps/s, half of the max)"
            f" for {latency['seconds']:.0f}s, "
            f"{latency['instances']:,} instances"
        ),
    )
    table.add_column("ms")
    for name in ("p50", "p95", "p99", "max"):
        table.add_column(name, justify="right")
    for key, label in (
        ("start_to_first_step", "start to first step"),
        ("step_to_next_step", "step to next step"),
        ("start_to_complete", "start to complete"),
    ):
        figures = latency[key]
        table.add_row(label, *(_f(figures[f"{p}_ms"], 1) for p in ("p50", "p95", "p99", "max")))
    console.print(table)


def _render_all_timers(console: Console, results: dict[str, Any]) -> None:
    """The timers section's runs, then the backlog section's."""
    timers = results.get("timers") or {}
    for run in (timers, timers.get("spread"), timers.get("resume")):
        if run:
            _render_timers(console, run)
    if results.get("backlog"):
        backlog.render(console, results["backlog"])
    if results.get("held"):
        held.render(console, results["held"])


def _render_timers(console: Console, run: dict[str, Any]) -> None:
    """One timers run: how late its sleeps fired, committed and resumed their workflows."""
    table = _section(
        console,
        f"3. Timers: {run['timers']:,} sleeps due {_due(run)}, 2 schedulers, 2 workers"
        f" (armed in {run['arming_s']:.1f}s, then made due {run.get('due_ahead_s', 0):g}s ahead)",
    )
    table.add_column("lateness after due")
    for name in ("p50", "p99", "max (all done)"):
        table.add_column(name, justify="right")
    # Before bench-nap, "resume_lateness" was the sleep's own settling (now "wake_lateness").
    resumed = "next step committed" if "wake_lateness" in run else "workflow resumed"
    for key, label in (
        ("fire_lateness", "timer fired"),
        ("commit_lateness", "fire committed"),
        ("wake_lateness", "wake committed"),
        ("resume_lateness", resumed),
    ):
        figures = run.get(key)
        if figures is None:  # a result file from before the figure existed
            continue
        table.add_row(label, _f(figures["p50_ms"], 0, " ms"), _f(figures["p99_ms"], 0, " ms"),
                      _f(figures["max_ms"] / 1000.0, 2, " s"))  # fmt: skip
    console.print(table)
    rate = run.get("resumed_per_s")
    if rate is not None and math.isfinite(rate):
        console.print(f"resumed {rate:,.0f} workflows/s (from the due time to the last next step committed)")
    cost = run.get("ms_per_resume")
    if cost:
        console.print(
            f"per resume: CPU of the workers {cost['workers_ms']:.2f} ms,"
            f" schedulers {cost['schedulers_ms']:.2f} ms, RabbitMQ {cost['broker_ms']:.2f} ms;"
            f" PostgreSQL executing {cost['database_ms']:.2f} ms"
        )


def _render_long(console: Console, long: dict[str, Any]) -> None:
    table = _section(
        console,
        (
            f"4. Long workflows: 1 worker, {long['in_flight']} instance(s) in flight, "
            f"{long['long']['instances']} x {long['long']['steps_per_instance']:,} vs "
            f"{long['short']['instances']:,} x {long['short']['steps_per_instance']} steps"
        ),
    )
    table.add_column("per step")
    long_name = f"{long['long']['steps_per_instance']:,}-step"
    short_name = f"{long['short']['steps_per_instance']}-step"
    for name in (long_name, short_name, "ratio"):
        table.add_column(name, justify="right")
    for key, label in (
        ("wall_ms_per_step", "wall ms"),
        ("worker_cpu_ms_per_step", "worker CPU ms"),
        ("machine_cpu_ms_per_step", "machine CPU ms"),
    ):
        figures = long[key]
        table.add_row(label, _f(figures["long"], 2), _f(figures["short"], 2), _f(figures["ratio"], 2, "x"))
    console.print(table)


def _render_memory(console: Console, throughput: dict[str, Any]) -> None:
    table = _section(console, "6. Memory: worker RSS (MiB, each worker) in the throughput runs")
    for name in ("workers", "at start", "after the run", "growth (largest)"):
        table.add_column(name, justify="right")
    for run in throughput["runs"]:
        table.add_row(
            str(run["workers"]), _mib(run["rss_start_kib"]), _mib(run["rss_end_kib"]),
            _f(run["rss_growth_pct"], 1, "%"),
        )  # fmt: skip
    console.print(table)


def _render_db_work(console: Console, throughput: dict[str, Any] | None, naive: dict[int, Any]) -> None:
    """PostgreSQL's counters per step, for the engine and naive runs that measured them."""
    work = [
        (f"engine, {run['workers']} worker(s)", run["db_per_step"])
        for run in (throughput or {}).get("runs", [])
        if run.get("db_per_step")
    ] + [(f"naive loop, {run['processes']} process(es)", run["db_per_step"]) for run in naive.values()]
    work = [(label, figures) for label, figures in work if figures]
    if not work:
        return
    table = _section(console, "PostgreSQL work per step (pg_stat_database counters / steps)")
    for name in ("run", "commits", "rollbacks", "rows inserted", "updated", "deleted"):
        table.add_column(name, justify="right" if name != "run" else "left")
    for label, figures in work:
        table.add_row(label, *(_f(figures[key], 2) for key in DB_COLUMNS))
    console.print(table)


def _render_targets(console: Console, verdicts: list[dict[str, Any]]) -> None:
    table = _section(console, "Targets (issue 6)")
    table.add_column("target")
    table.add_column("measured", justify="right")
    table.add_column("", justify="center")
    for row in verdicts:
        table.add_row(row["target"], row["measured"], "[green]met[/]" if row["met"] else "[red]not met[/]")
    console.print(table)


def write(results: dict[str, Any], stamp: str) -> Path:
    """Write ``benchmarks/results/<stamp>.json``; returns its path."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{stamp}.json"
    path.write_text(json.dumps(_clean(results), indent=2, default=str, allow_nan=False) + "\n")
    return path


def _clean(value: Any) -> Any:
    """NaN and infinities (a figure that could not be measured) become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _clean(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(item) for item in value]
    return value
