"""The demo behind ``make run``: 20 orders through workers and a scheduler, end to end.

Run it with ``python -m examples.demo``. ``make run`` sets ``STEPLINE_EMBEDDED``:
the embedded mode, on SQLite files, with no service to install; ``make run-stack``
sets the two URLs of PostgreSQL and RabbitMQ instead. It migrates the database,
starts ``stepline dev`` (or ``stepline fleet``) as a child process, publishes 20
``order-fulfilment`` start events, shows their progress, prints how each one
ended, and always stops the processes it started.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import random
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from examples.order_fulfilment import Order, order_fulfilment
from stepline import Client, ConfigError, InstanceInfo, Producer, Settings, load_settings
from stepline.shared.db import stores

ORDER_COUNT = 20
WORKER_COUNT = 2
WORKER_CONCURRENCY = 8
MIN_FLAKY_ORDERS = 4
"""At least this many orders are picked so that their first charge attempt fails."""
DEADLINE_S = 120.0
READY_DEADLINE_S = 60.0
"""How long the fleet's workers may take to start consuming."""
POLL_INTERVAL_S = 0.25
STOP_GRACE_S = 20.0
LOG_TAIL_LINES = 15
REPO_ROOT = Path(__file__).resolve().parent.parent

CATALOGUE: dict[str, int] = {
    "KB-75-BROWN": 12_900,
    "MOUSE-ERGO-L": 5_490,
    "USB-C-HUB-7": 3_999,
    "MON-27-4K": 32_900,
    "DESK-MAT-XL": 2_450,
    "CAM-1080-AF": 7_900,
    "HEADSET-BT-ANC": 18_900,
    "CABLE-TB4-2M": 4_290,
}
"""SKU -> unit price in cents; none is discontinued, so every order can complete."""

CUSTOMERS = (
    "ada.lovelace",
    "grace.hopper",
    "alan.turing",
    "katherine.johnson",
    "edsger.dijkstra",
    "barbara.liskov",
    "donald.knuth",
    "margaret.hamilton",
    "ken.thompson",
    "frances.allen",
)

# ---------------------------------------------------------------- orders


def is_flaky(order_id: str) -> bool:
    """Whether the example's payment gateway times out on this order's first attempt.

    Mirrors ``charge_payment`` in ``examples/order_fulfilment.py``: the first try
    fails for orders whose id hashes to a multiple of three.
    """
    return int(hashlib.sha256(order_id.encode()).hexdigest()[:12], 16) % 3 == 0


def make_orders(seed: str, count: int = ORDER_COUNT, min_flaky: int = MIN_FLAKY_ORDERS) -> list[Order]:
    """Varied, realistic orders whose ids include at least ``min_flaky`` that need a retry.

    Ids are taken in sequence; a flaky one is always kept, a smooth one only
    while enough places are left for the flaky ones still needed.
    """
    rng = random.Random(seed)
    orders: list[Order] = []
    smooth_wanted = count - min_flaky
    number = rng.randrange(100_000, 900_000)
    while len(orders) < count:
        number += 1
        order_id = f"SO-{number}"
        if not is_flaky(order_id):
            if smooth_wanted == 0:
                continue
            smooth_wanted -= 1
        sku, unit_cents = rng.choice(list(CATALOGUE.items()))
        quantity = rng.choice((1, 1, 1, 2, 2, 3, 5))
        orders.append(
            Order(
                order_id=order_id,
                sku=sku,
                quantity=quantity,
                amount_cents=unit_cents * quantity,
                email=f"{rng.choice(CUSTOMERS)}@example.com",
            )
        )
    return orders


# ---------------------------------------------------------------- processes


@dataclass(frozen=True)
class Service:
    """A child process the demo started, and the file its output goes to."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def is_running(self) -> bool:
        """Whether the process has not exited yet."""
        return self.process.poll() is None


def start_service(name: str, argv: Sequence[str], env: dict[str, str], log_dir: Path) -> Service:
    """Start one command with its stdout and stderr going to ``<log_dir>/<name>.log``."""
    log_path = log_dir / f"{name}.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            list(argv),
            cwd=REPO_ROOT,  # so that ``examples`` is importable by the workers
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            # Own session: Ctrl-C reaches only the demo, which then stops the children
            # with one SIGTERM each (a second signal would make them exit at once).
            start_new_session=True,
        )
    return Service(name, process, log_path)


def start_fleet(
    console: Console, settings: Settings, env: dict[str, str], log_dir: Path, started: list[Service]
) -> None:
    """Start the workers and the scheduler, supervised, appended to ``started``.

    On PostgreSQL and RabbitMQ that is ``stepline fleet`` (each member logs to
    ``log_dir/fleet/NAME.log``); in the embedded mode ``stepline dev``, a worker
    and a scheduler over the SQLite files. Either restarts a member that crashes
    and stops them all on SIGTERM.
    """
    command = [str(Path(sys.executable).parent / "stepline")]
    common = ["--workflows", "examples.order_fulfilment", "--concurrency", str(WORKER_CONCURRENCY)]
    if settings.embedded is not None:
        argv = [*command, "dev", *common, "--state", str(settings.embedded)]
        what = f"stepline dev: a worker and a scheduler on the SQLite files in {settings.embedded}"
    else:
        argv = [*command, "fleet", "--workers", str(WORKER_COUNT), "--schedulers", "1", *common]
        argv += ["--log-dir", str(log_dir / "fleet")]
        what = f"stepline fleet: {WORKER_COUNT} workers and a scheduler"
    service = start_service("fleet", argv, env, log_dir)
    started.append(service)
    console.print(f"  started {what}, pid {service.process.pid}")


def stop_fleet(console: Console, services: Sequence[Service]) -> None:
    """SIGTERM every process by pid, wait up to ``STOP_GRACE_S`` in all, then SIGKILL the rest.

    A Ctrl-C while waiting skips straight to SIGKILL, so nothing is left behind.
    """
    running = [service for service in services if service.is_running]
    if not running:
        return
    console.print(f"stopping {len(running)} process(es) (SIGTERM, up to {STOP_GRACE_S:g} s)...")
    for service in running:
        service.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_S
    try:
        for service in running:
            with contextlib.suppress(subprocess.TimeoutExpired):
                service.process.wait(timeout=max(0.0, deadline - time.monotonic()))
    finally:
        for service in running:
            if service.is_running:
                console.print(f"  {service.name} (pid {service.process.pid}) did not stop: SIGKILL")
                service.process.kill()
                service.process.wait()
        for service in running:
            console.print(
                f"  {service.name:<10} pid {service.process.pid} exited with {service.process.returncode}"
            )


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> list[str]:
    """The last ``lines`` lines of a log file (empty if it cannot be read)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return []
    return text.splitlines()[-lines:]


def print_log_tails(console: Console, services: Sequence[Service]) -> None:
    """Show the end of every process log, to explain a failed run."""
    for service in services:
        code = service.process.poll()
        state = "running" if code is None else f"exited with {code}"
        console.rule(f"{service.name} ({state}): last lines of {service.log_path}")
        for line in log_tail(service.log_path) or ["(empty)"]:
            console.print(line, markup=False, highlight=False, soft_wrap=True)


# ---------------------------------------------------------------- publishing and tracking


async def publish_orders(
    console: Console,
    settings: Settings,
    orders: Sequence[Order],
    instance_ids: Sequence[str],
    fleet_alive: Callable[[], bool],
) -> None:
    """Publish one start event per order (params validated against the workflow first)."""
    async with Producer.from_settings(settings) as producer:
        await until_served(producer, fleet_alive)
        console.print(f"a worker serves [bold]{order_fulfilment.name}[/bold]")
        await producer.start_batch(order_fulfilment, orders, instance_ids=instance_ids)


async def until_served(producer: Producer, fleet_alive: Callable[[], bool]) -> None:
    """Wait until a worker of the fleet serves ``order-fulfilment``.

    The run's namespace is new, and a producer refuses to start a workflow that
    no worker serving it has registered there (a mistyped name would otherwise
    wait forever). A worker registers it by declaring its queue as it starts
    consuming; where the broker can tell (RabbitMQ), wait until it consumes too.

    Raises:
        RuntimeError: the fleet exited, or no worker was ready within ``READY_DEADLINE_S``.
    """
    deadline = time.monotonic() + READY_DEADLINE_S
    while True:
        queue = await producer.workflow_queue(order_fulfilment.name)
        if queue is not None and queue.consumers != 0:
            return
        if not fleet_alive():
            raise RuntimeError("the fleet exited before a worker was ready")
        if time.monotonic() >= deadline:
            raise RuntimeError(f"no worker served {order_fulfilment.name!r} within {READY_DEADLINE_S:g} s")
        await asyncio.sleep(POLL_INTERVAL_S)


def describe_statuses(infos: dict[str, InstanceInfo | None]) -> str:
    """A short count of instance statuses, e.g. ``complete 12 · waiting 5 · queued 3``."""
    counts = Counter("queued" if info is None else info.status for info in infos.values())
    return " · ".join(f"{status} {count}" for status, count in counts.most_common())


async def track(
    console: Console,
    client: Client,
    instance_ids: Sequence[str],
    deadline_s: float,
    fleet_alive: Callable[[], bool],
) -> dict[str, InstanceInfo | None]:
    """Poll each unfinished instance with a progress bar until all finish or the deadline passes.

    Stops early if a process of the fleet exits. An instance no worker has
    created yet maps to ``None``.
    """
    infos: dict[str, InstanceInfo | None] = dict.fromkeys(instance_ids)
    deadline = time.monotonic() + deadline_s
    columns = (
        SpinnerColumn(),
        TextColumn("[bold]orders finished"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.description}"),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("", total=len(instance_ids))
        while True:
            for instance_id, known in infos.items():
                if known is None or not known.is_finished:
                    infos[instance_id] = await client.get(instance_id)
            finished = sum(1 for info in infos.values() if info is not None and info.is_finished)
            progress.update(task, completed=finished, description=describe_statuses(infos))
            if finished == len(instance_ids) or time.monotonic() >= deadline or not fleet_alive():
                return infos
            await asyncio.sleep(POLL_INTERVAL_S)


async def run_orders(
    console: Console,
    settings: Settings,
    orders: Sequence[Order],
    instance_ids: Sequence[str],
    fleet_alive: Callable[[], bool],
) -> dict[str, InstanceInfo | None]:
    """Publish the orders, then follow them to the end; returns each instance as last seen."""
    await publish_orders(console, settings, orders, instance_ids, fleet_alive)
    console.print(f"published {len(orders)} start events of [bold]{order_fulfilment.name}[/bold]")
    async with Client(settings.database) as client:
        return await track(console, client, instance_ids, DEADLINE_S, fleet_alive)


# ---------------------------------------------------------------- report


@dataclass(frozen=True)
class Outcome:
    """One order's row in the outcome table."""

    instance_id: str
    status: str
    steps: int
    attempts: int
    duration_s: float | None
    detail: str

    @property
    def retries(self) -> int:
        """Attempts beyond the first of each step."""
        return self.attempts - self.steps


def outcome_of(instance_id: str, info: InstanceInfo | None) -> Outcome:
    """Summarise an instance: step count, attempts, duration, payment id or error."""
    if info is None:
        return Outcome(instance_id, "not started", 0, 0, None, "no worker created it")
    calls = [step for step in info.steps if step.kind == "step"]
    duration = (info.finished_at - info.created_at).total_seconds() if info.finished_at else None
    if info.error:
        detail = f"{info.error.get('type', 'error')}: {info.error.get('message', '')}"
    elif isinstance(info.output, dict):
        detail = str(info.output.get("payment_id", ""))
    else:
        detail = ""
    return Outcome(
        instance_id, info.status, len(calls), sum(step.attempts for step in calls), duration, detail
    )


def outcome_table(outcomes: Sequence[Outcome]) -> Table:
    """The rich table of every order's outcome."""
    table = Table(
        title="order-fulfilment outcomes",
        caption="steps and attempts count step calls; the cool-off sleep is not one",
    )
    table.add_column("instance id", no_wrap=True)
    table.add_column("status")
    table.add_column("steps", justify="right")
    table.add_column("attempts", justify="right")
    table.add_column("duration", justify="right")
    table.add_column("payment id / error", overflow="fold")
    for outcome in outcomes:
        colour = "green" if outcome.status == "complete" else "red"
        attempts = f"[yellow]{outcome.attempts}[/yellow]" if outcome.retries else str(outcome.attempts)
        duration = "-" if outcome.duration_s is None else f"{outcome.duration_s:.1f} s"
        table.add_row(
            outcome.instance_id,
            f"[{colour}]{outcome.status}[/{colour}]",
            str(outcome.steps),
            attempts,
            duration,
            outcome.detail,
        )
    return table


# ---------------------------------------------------------------- main


def demo_environment(namespace: str) -> dict[str, str]:
    """The children's environment: ours, with the run's own namespace and a short grace."""
    env = dict(os.environ)
    env["STEPLINE_NAMESPACE"] = namespace
    # In-flight steps must finish before stop_fleet's SIGKILL, not after the 30 s default.
    env["STEPLINE_WORKER__SHUTDOWN_GRACE"] = f"{STOP_GRACE_S / 2:g}s"
    return env


def run_demo(console: Console, settings: Settings, run_id: str, log_dir: Path) -> int:
    """Start the fleet, run the orders, report; the fleet is stopped whatever happens.

    Returns:
        The exit code: 0 only if every order completed.
    """
    orders = make_orders(run_id)
    instance_ids = [f"{run_id}-{order.order_id.lower()}" for order in orders]
    services: list[Service] = []
    try:
        start_fleet(console, settings, demo_environment(settings.namespace), log_dir, services)

        def fleet_alive() -> bool:
            return all(service.is_running for service in services)

        infos = asyncio.run(run_orders(console, settings, orders, instance_ids, fleet_alive))
        outcomes = [outcome_of(instance_id, infos[instance_id]) for instance_id in instance_ids]
        console.print(outcome_table(outcomes))
        complete = sum(1 for outcome in outcomes if outcome.status == "complete")
        retries = sum(outcome.retries for outcome in outcomes)
        retried = sum(1 for outcome in outcomes if outcome.retries)
        console.print(
            f"[bold]{complete}/{len(outcomes)} complete[/bold], "
            f"{retries} retries in {retried} orders (the payment gateway's first-try time-outs)"
        )
        if complete == len(outcomes):
            return 0
        dead = [service.name for service in services if not service.is_running]
        reason = f"{', '.join(dead)} exited early" if dead else f"not all finished within {DEADLINE_S:g} s"
        console.print(f"[red]demo failed: {len(outcomes) - complete} orders not complete ({reason})[/red]")
        print_log_tails(console, services)
        return 1
    except Exception as exc:
        console.print(f"[red]demo failed: {type(exc).__name__}: {exc}[/red]")
        print_log_tails(console, services)
        return 1
    finally:
        stop_fleet(console, services)


def main() -> int:
    """Load settings, migrate, run the demo; returns the exit code."""
    run_id = f"demo-{secrets.token_hex(4)}"
    try:
        # The configured namespace, not a fresh one: a namespace belongs to its
        # database, and instances an interrupted earlier run left behind simply
        # complete alongside this run's, which is the durability being shown.
        settings = load_settings()
    except ConfigError as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 2
    console = Console()
    if not console.is_terminal:
        console.width = max(console.width, 120)  # logs and CI: keep table rows on one line
    console.print(f"[bold]Stepline demo[/bold] run {run_id}")
    try:
        stores.upgrade(settings.database)
    except Exception as exc:  # the driver's errors vary; one line is what the user needs
        first_line = next(iter(str(exc).splitlines()), "")
        print(f"demo: migration failed: {type(exc).__name__}: {first_line}", file=sys.stderr)
        return 1
    if settings.embedded is not None:
        console.print(f"embedded mode: state in {settings.embedded.resolve()} (no PostgreSQL, no RabbitMQ)")
    console.print("database migrated to head")
    log_dir = Path(tempfile.mkdtemp(prefix=f"stepline-{run_id}-"))
    console.print(f"process logs: {log_dir}")
    # Turn SIGTERM into KeyboardInterrupt so the fleet is stopped on it as on Ctrl-C.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        return run_demo(console, settings, run_id, log_dir)
    except KeyboardInterrupt:
        console.print(f"[red]interrupted; process logs are in {log_dir}[/red]")
        return 130


if __name__ == "__main__":
    sys.exit(main())
