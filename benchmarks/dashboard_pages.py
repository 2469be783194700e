"""The dashboard's pages on the big database (issue 21: "under 200 ms with 1,000,000 instances").

``serve_and_time`` runs ``stepline ui`` as a process of its own on the big database
(``--read-only``, a port the OS picks), reads a real instance, workflow and build from
that database to fill the pages' filters, times each page with
``bigdb_bench.time_dashboard`` (end to end over HTTP: routing, queries, templates), and
stops the server by its pid.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from urllib.parse import quote

import psycopg

from benchmarks.bigdb_bench import Timing, time_dashboard
from benchmarks.procs import BIN, ROOT, child_env

START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0
_ADDRESS = re.compile(rb"stepline ui: (http://\S+/)")


def paths(instance_id: str, workflow: str, build_id: str | None) -> list[str]:
    """The pages an operator opens, with filters that hit the big tables."""
    found = [
        "/",
        "/instances",
        "/instances?status=running",
        f"/instances?workflow={quote(workflow)}&status=complete",
        f"/instances?id={quote(instance_id[:4])}",
        f"/instances/{quote(instance_id, safe='')}",
        "/dead-letters",
        "/schedules",
    ]
    if build_id is not None:
        found.insert(5, f"/instances?build={quote(build_id)}")
    return found


def _sample(database_url: str) -> tuple[str, str, str | None]:
    """One finished instance of the big database: its id, workflow and build."""
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "SELECT id, workflow, build_id FROM instances WHERE status = 'complete' "
            "ORDER BY created_at LIMIT 1"
        ).fetchone()
    if row is None:
        raise RuntimeError("the big database holds no complete instance to show")
    return row[0], row[1], row[2]


async def _address(server: asyncio.subprocess.Process) -> str:
    """The address ``stepline ui`` prints once it listens."""
    assert server.stdout is not None
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        line = await asyncio.wait_for(server.stdout.readline(), timeout=deadline - time.monotonic())
        if not line:
            break
        found = _ADDRESS.search(line)
        if found:
            return found.group(1).decode()
    raise RuntimeError(f"stepline ui printed no address within {START_TIMEOUT_S:.0f} s")


async def serve_and_time(database_url: str, amqp_url: str, samples: int) -> list[Timing]:
    """Serve the dashboard on ``database_url`` and time its pages, ``samples`` fetches each."""
    instance_id, workflow, build_id = await asyncio.to_thread(_sample, database_url)
    server = await asyncio.create_subprocess_exec(
        str(BIN / "stepline"),
        "ui",
        "--port",
        "0",
        "--read-only",
        env=child_env(database_url, amqp_url),
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    drain: asyncio.Task[bytes] | None = None
    try:
        base = await _address(server)
        assert server.stdout is not None
        drain = asyncio.create_task(server.stdout.read())  # its access log must not fill the pipe
        return await asyncio.to_thread(time_dashboard, base, paths(instance_id, workflow, build_id), samples)
    finally:
        if server.returncode is None:
            server.terminate()
            try:
                await asyncio.wait_for(server.wait(), timeout=STOP_TIMEOUT_S)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    server.kill()
                await server.wait()
        if drain is not None:
            await drain
