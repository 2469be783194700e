"""The fan-out section: one instance gathering many parallel steps, and many instances fanning out.

``python -m benchmarks --only fanout``:

- wide: one instance of ``bench-fanout`` gathering ``fanout_width`` (1,000 in
  the full run) trivial steps, on 2 workers: the time from its start to its end.
  Every branch is a message of its own and commits on its own, so a commit
  that reloaded and replayed the whole instance would make this grow with the
  square of the width; PostgreSQL's rows read per step show that without noise.
- many: ``fanout_instances`` instances (100) each gathering ``fanout_branches``
  (100) steps, on 2 workers: steps/s against the naive loop with 2 processes.
  No step of this workload runs locally (parallel steps always go out as messages).
"""

from __future__ import annotations

import math
from typing import Any

from rich.console import Console
from rich.table import Table

from benchmarks.sections import Bench, EngineRun
from benchmarks.workflows import Fan, bench_fanout, expected_fanout

WORKERS = 2
WIDE_LIMIT_S = 10.0
"""Issue 23: one instance gathering 1,000 steps completes on 2 workers within this."""


async def run(bench: Bench) -> dict[str, Any]:
    """Both parts; returns what the report prints (and the JSON keeps)."""
    width = bench.sizes.fanout_width
    wide = await _run(bench, "fw", 1, width, f"fan-out: 1 instance x {width:,} parallel steps")
    bench.note(f"fan-out wide: 1 x {width:,} steps in {wide.elapsed_s:.1f}s ({wide.steps_per_s:.0f} steps/s)")
    count, branches = bench.sizes.fanout_instances, bench.sizes.fanout_branches
    reference = bench.naive.get(WORKERS)
    if reference is None:
        reference = await bench.naive_run(WORKERS)
        bench.naive[WORKERS] = reference
    many = await _run(bench, "fm", count, branches, f"fan-out: {count} instances x {branches} parallel steps")
    ratio = many.steps_per_s / reference.steps_per_s
    bench.note(
        f"fan-out many: {count} x {branches} steps, {many.steps_per_s:.0f} steps/s,"
        f" {ratio:.2f}x the naive loop ({reference.steps_per_s:.0f})"
    )
    return {
        "workers": WORKERS,
        "wide": wide.as_json(),
        "many": many.as_json(),
        "naive_steps_per_s": reference.steps_per_s,
        "many_vs_naive": ratio,
    }


async def _run(bench: Bench, label: str, count: int, width: int, description: str) -> EngineRun:
    return await bench.engine_run(
        label=label,
        workers=WORKERS,
        workflow=bench_fanout,
        params=lambda i: Fan(n=i, width=width),
        expected=lambda i: expected_fanout(i, width),
        count=count,
        steps_per_instance=width,
        description=description,
    )


def targets(fanout: dict[str, Any]) -> list[dict[str, Any]]:
    """The section's rows of the target table."""
    wide, many = fanout["wide"], fanout["many"]
    elapsed = wide["elapsed_s"] if _finite(wide["elapsed_s"]) else None
    return [
        {
            "target": f"1 instance gathering {wide['steps_per_instance']:,} steps, 2 workers,"
            f" < {WIDE_LIMIT_S:.0f} s (issue 23)",
            "measured": f"{elapsed:.1f} s" if elapsed is not None else "did not finish",
            "met": elapsed is not None and elapsed < WIDE_LIMIT_S and wide["check"]["ok"],
        },
        {
            "target": f"steps/s, {many['instances']} x {many['steps_per_instance']} fan-out,"
            " 2 workers >= 1.0x naive loop (issue 23)",
            "measured": f"{fanout['many_vs_naive']:.2f}x ({many['steps_per_s']:.0f} vs"
            f" {fanout['naive_steps_per_s']:.0f})",
            "met": fanout["many_vs_naive"] >= 1.0 and many["check"]["ok"],
        },
    ]


def checks(fanout: dict[str, Any]) -> list[tuple[str, bool]]:
    """Whether every fan-out instance completed with the right output."""
    return [(f"fanout/{part}", fanout[part]["check"]["ok"]) for part in ("wide", "many")]


def render(console: Console, fanout: dict[str, Any]) -> None:
    """One row per part: time, steps/s, CPU and PostgreSQL work per step."""
    console.print(f"\n[bold]Fan-out: parallel steps gathered, {fanout['workers']} workers[/]")
    table = Table()
    for name in (
        "run",
        "seconds",
        "steps/s",
        "worker CPU ms/step",
        "commits/step",
        "rows read/step",
        "check",
    ):
        table.add_column(name, justify="left" if name in ("run", "check") else "right")
    for part in ("wide", "many"):
        run = fanout[part]
        db = run.get("db_per_step") or {}
        table.add_row(
            f"{run['instances']:,} x {run['steps_per_instance']:,} steps",
            _f(run["elapsed_s"], 1),
            _f(run["steps_per_s"], 0),
            _f(run["worker_cpu_ms_per_step"], 2),
            _f(db.get("xact_commit"), 2),
            _f(db.get("tup_fetched"), 1),
            "ok" if run["check"]["ok"] else "FAILED",
        )
    table.caption = f"naive loop, 2 processes: {fanout['naive_steps_per_s']:,.0f} steps/s"
    console.print(table)


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def _f(value: Any, digits: int) -> str:
    return f"{value:,.{digits}f}" if _finite(value) else "-"
