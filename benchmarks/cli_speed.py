"""The cli section: how long an operator waits for ``stepline --help`` and ``stepline status ID``.

``python -m benchmarks --only cli``: each command runs ``RUNS`` times, one after the
other, as the installed console script in a fresh process (what a person types), and
the median wall time is held against issue 21's targets: ``--help`` under 0.3 s,
``status`` under 0.5 s. ``status`` reads a real instance in the run's PostgreSQL
database (inserted directly: a running ``bench-chain`` instance with 20 succeeded
steps), with ``STEPLINE_AMQP_URL`` set as an operator's shell has it. Nearly all of
either time is Python importing modules, which is why ``tests/unit/test_cli_imports.py``
guards what each command imports; this section says what that buys on this machine.
The CPU time the process used is kept next to its wall time: on a shared machine the
wall time grows with the other work, the CPU time much less.
"""

from __future__ import annotations

import asyncio
import compileall
import resource
import statistics
import time
from typing import Any

from rich.console import Console
from rich.table import Table

from benchmarks.procs import BIN, ROOT
from benchmarks.sections import Bench
from benchmarks.workflows import bench_chain

RUNS = 9
"""Runs of each command; the first pays for a cold file cache, the median does not care."""
STEPS = 20
INSTANCE_ID = "cli-status-1"
TARGETS_S = {"help": 0.3, "status": 0.5}
"""Issue 21, item 5: the median wall time each command should stay under on this machine."""


async def run(bench: Bench) -> dict[str, Any]:
    """Both commands' wall times, with the instance ``status`` reads inserted first."""
    await bench.reset("cli")
    await _insert_instance(bench)
    _compile_bytecode()
    result: dict[str, Any] = {"runs": RUNS, "store": "postgresql", "bytecode": "compiled", "commands": {}}
    for name, argv in (("help", ["--help"]), ("status", ["status", INSTANCE_ID])):
        task = bench.progress.add_task(f"stepline {' '.join(argv)}", total=RUNS)
        try:
            seconds, cpu = [], []
            for _ in range(RUNS):
                wall_s, cpu_s = await _timed(bench, argv)
                seconds.append(wall_s)
                cpu.append(cpu_s)
                bench.progress.advance(task)
        finally:
            bench.progress.remove_task(task)
        result["commands"][name] = {
            "argv": ["stepline", *argv],
            "median_s": statistics.median(seconds),
            "min_s": min(seconds),
            "max_s": max(seconds),
            "seconds": seconds,
            "cpu_median_s": statistics.median(cpu),
            "target_s": TARGETS_S[name],
        }
    timings = result["commands"]
    bench.note(
        f"cli: stepline --help {timings['help']['median_s']:.2f} s, "
        f"stepline status {timings['status']['median_s']:.2f} s (medians of {RUNS})"
    )
    return result


def _compile_bytecode() -> None:
    """Stepline's modules compiled to bytecode first, as pip compiles them installing the wheel.

    A checkout run with ``PYTHONDONTWRITEBYTECODE=1`` would otherwise compile every Stepline
    module a command imports in each process (0.07 s of CPU for ``status`` here), which no
    installed ``stepline`` does. The ``__pycache__`` folders written are git-ignored.
    """
    compileall.compile_dir(ROOT / "stepline", maxlevels=0, quiet=1)  # its subfolders link to these:
    for package in ("shared", "worker", "scheduler", "producer"):
        compileall.compile_dir(ROOT / package, quiet=1)


async def _insert_instance(bench: Bench) -> None:
    async with bench.connection() as conn:
        await conn.execute(
            "INSERT INTO instances (id, workflow, status, params) VALUES (%s, %s, 'running', %s)",
            (INSTANCE_ID, bench_chain.name, f'{{"n": 1, "steps": {STEPS + 1}}}'),
        )
        await conn.execute(
            "INSERT INTO steps (instance_id, name, occurrence, position, kind, status, attempt, result)"
            " SELECT %s, 'add', k, k, 'step', 'succeeded', 1, to_jsonb(1 + k)"
            " FROM generate_series(1, %s::int) AS k",
            (INSTANCE_ID, STEPS),
        )


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


async def _timed(bench: Bench, argv: list[str]) -> tuple[float, float]:
    """Wall seconds from starting ``stepline ARGV`` to its exit, and the CPU seconds it used.

    A failed command fails the section. (No other child of the benchmark runs meanwhile,
    so the growth of the children's CPU time is this command's.)
    """
    cpu_before = _children_cpu_s()
    began = time.monotonic()
    process = await asyncio.create_subprocess_exec(
        str(BIN / "stepline"),
        *argv,
        env=bench.fleet.env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await process.communicate()
    elapsed = time.monotonic() - began
    if process.returncode != 0:
        raise RuntimeError(f"stepline {' '.join(argv)} exited {process.returncode}: {stderr.decode()[-500:]}")
    if argv[0] == "status" and INSTANCE_ID not in stdout.decode():
        raise RuntimeError(f"stepline status did not show {INSTANCE_ID}: {stdout.decode()[:500]}")
    return elapsed, _children_cpu_s() - cpu_before


def targets(cli: dict[str, Any]) -> list[dict[str, Any]]:
    """A target-table row per command: its median against its target."""
    return [
        {
            "target": f"{' '.join(timing['argv'][:2])} median < {timing['target_s']:g} s",
            "measured": (
                f"{timing['median_s']:.2f} s (min {timing['min_s']:.2f}; CPU {timing['cpu_median_s']:.2f} s)"
            ),
            "met": timing["median_s"] < timing["target_s"],
        }
        for timing in cli["commands"].values()
    ]


def render(console: Console, cli: dict[str, Any]) -> None:
    """One row per command: median, min and max wall time."""
    table = Table(
        title=f"Commands: wall time of a fresh process, {cli['runs']} runs each ({cli['store']})",
        title_justify="left",
    )
    table.add_column("command")
    table.add_column("median", justify="right")
    table.add_column("min", justify="right")
    table.add_column("max", justify="right")
    table.add_column("CPU (median)", justify="right")
    table.add_column("target", justify="right")
    for timing in cli["commands"].values():
        table.add_row(
            " ".join(timing["argv"]),
            f"{timing['median_s']:.3f} s",
            f"{timing['min_s']:.3f} s",
            f"{timing['max_s']:.3f} s",
            f"{timing['cpu_median_s']:.3f} s",
            f"< {timing['target_s']:g} s",
        )
    console.print(table)
