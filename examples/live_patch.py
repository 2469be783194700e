"""A live patch, end to end: version 2 of order-fulfilment deployed while orders sleep.

Run it with ``STEPLINE_EMBEDDED=.stepline/demo python -m examples.live_patch``
(or with the two URLs of PostgreSQL and RabbitMQ). It migrates the database, then:

1. starts a worker on ``examples.order_fulfilment`` (version 1) and publishes
   3 orders; each charges the card and goes to sleep in its cool-off. No
   scheduler runs yet, so no cool-off can end before the deploy: that is the
   window a real deploy hits by chance, held open on purpose;
2. stops that worker and starts a worker on ``examples.order_fulfilment_v2``
   (the fraud check behind ``ctx.patched``) and a scheduler: the deploy;
3. publishes 3 new orders, follows all 6 to the end, and prints each one's
   steps: the sleeping orders finish without a fraud check, the new ones
   record the ``$patch:fraud-check`` marker and run it.

It exits 0 only if all 6 complete on the expected path, and always stops the
processes it started. See docs/versioning.md, "Worked example".
"""

from __future__ import annotations

import asyncio
import secrets
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from rich.console import Console
from rich.table import Table

from examples.demo import (
    DEADLINE_S,
    POLL_INTERVAL_S,
    Service,
    demo_environment,
    is_flaky,
    make_orders,
    print_log_tails,
    start_service,
    stop_fleet,
    until_served,
)
from examples.order_fulfilment import Order, order_fulfilment
from stepline import Client, ConfigError, InstanceInfo, Producer, Settings, load_settings
from stepline.shared.db import stores

ORDERS_PER_VERSION = 3
FRAUD_CHECK = "fraud-check"
MARKER = f"$patch:{FRAUD_CHECK}"


def smooth_orders(seed: str, count: int) -> list[Order]:
    """Orders whose first charge succeeds: a retry back-off needs the scheduler, held back in phase 1."""
    return [order for order in make_orders(seed, count * 4, min_flaky=0) if not is_flaky(order.order_id)][
        :count
    ]


def start(console: Console, name: str, argv: list[str], env: dict[str, str], log_dir: Path) -> Service:
    """Start one command from the virtualenv's bin directory and say so."""
    command = str(Path(sys.executable).parent / argv[0])
    service = start_service(name, [command, *argv[1:]], env, log_dir)
    console.print(f"  started {' '.join(argv)}, pid {service.process.pid}")
    return service


def instance_ids(run_id: str, orders: Sequence[Order]) -> list[str]:
    """The run's instance ids: earlier runs' orders may still be in the same state."""
    return [f"{run_id}-{order.order_id.lower()}" for order in orders]


async def publish(
    console: Console, settings: Settings, run_id: str, orders: Sequence[Order], alive: Callable[[], bool]
) -> None:
    """Publish one start event per order."""
    async with Producer.from_settings(settings) as producer:
        await until_served(producer, alive)
        await producer.start_batch(order_fulfilment, orders, instance_ids=instance_ids(run_id, orders))
    console.print(f"  published {', '.join(instance_ids(run_id, orders))}")


async def until(
    client: Client,
    instance_ids: Sequence[str],
    done: Callable[[InstanceInfo], bool],
    alive: Callable[[], bool],
) -> dict[str, InstanceInfo | None]:
    """Poll the instances until ``done`` holds for each, the deadline passes or a process exits."""
    infos: dict[str, InstanceInfo | None] = dict.fromkeys(instance_ids)
    deadline = time.monotonic() + DEADLINE_S
    while True:
        for instance_id in instance_ids:
            infos[instance_id] = await client.get(instance_id)
        if all(info is not None and done(info) for info in infos.values()):
            return infos
        if time.monotonic() >= deadline or not alive():
            return infos
        await asyncio.sleep(POLL_INTERVAL_S)


def asleep_in_cool_off(info: InstanceInfo) -> bool:
    """Whether the instance waits on its cool-off timer."""
    return info.status == "waiting" and any(step.name == "cool-off" for step in info.steps)


def settled(info: InstanceInfo) -> bool:
    """Finished, or held: a held instance waits for an operator, so waiting on longer shows nothing."""
    return info.is_finished or info.status == "paused"


def steps_table(rows: Sequence[tuple[str, str, InstanceInfo | None]]) -> Table:
    """Each order's version at start, status and the names of its history entries."""
    table = Table(title="order-fulfilment after the live patch")
    table.add_column("instance id", no_wrap=True)
    table.add_column("started on")
    table.add_column("status")
    table.add_column("history", overflow="fold")
    for instance_id, version, info in rows:
        status = "not started" if info is None else info.status
        colour = "green" if status == "complete" else "red"
        names = [] if info is None else [step.name for step in info.steps]
        shown = ", ".join(f"[bold]{name}[/bold]" if FRAUD_CHECK in name else name for name in names)
        if info is not None and info.error:
            shown += f"\n[red]{info.error.get('type', 'error')}: {info.error.get('message', '')}[/red]"
        table.add_row(instance_id, version, f"[{colour}]{status}[/{colour}]", shown)
    return table


async def scenario(
    console: Console, settings: Settings, run_id: str, log_dir: Path, services: list[Service]
) -> bool:
    """Phase 1 on version 1, the deploy, phase 2 on version 2; True if every order took its path."""
    env = demo_environment(settings.namespace)

    def alive() -> bool:
        return all(service.is_running for service in services)

    old = smooth_orders(f"{run_id}-v1", ORDERS_PER_VERSION)
    new = make_orders(f"{run_id}-v2", ORDERS_PER_VERSION, min_flaky=1)
    async with Client(settings.database) as client:
        console.rule("version 1")
        v1 = start(
            console,
            "worker-v1",
            ["stepline-worker", "--workflows", "examples.order_fulfilment"],
            env,
            log_dir,
        )
        services.append(v1)
        await publish(console, settings, run_id, old, alive)
        asleep = await until(client, instance_ids(run_id, old), asleep_in_cool_off, alive)
        if not all(info is not None and asleep_in_cool_off(info) for info in asleep.values()):
            console.print("[red]the version 1 orders did not all reach their cool-off[/red]")
            return False
        console.print(f"  all {len(old)} orders asleep in their cool-off")

        console.rule("deploy version 2")
        stop_fleet(console, [v1])
        services.remove(v1)
        worker = ["stepline-worker", "--workflows", "examples.order_fulfilment_v2"]
        services.append(start(console, "worker-v2", worker, env, log_dir))
        services.append(start(console, "scheduler", ["stepline-scheduler"], env, log_dir))
        await publish(console, settings, run_id, new, alive)

        old_ids, new_ids = instance_ids(run_id, old), instance_ids(run_id, new)
        ids = [*old_ids, *new_ids]
        infos = await until(client, ids, settled, alive)
    rows = [(instance_id, "v1", infos[instance_id]) for instance_id in old_ids]
    rows += [(instance_id, "v2", infos[instance_id]) for instance_id in new_ids]
    console.print(steps_table(rows))

    def took(info: InstanceInfo | None, patched: bool) -> bool:
        if info is None or info.status != "complete":
            return False
        names = [step.name for step in info.steps]
        return (MARKER in names and FRAUD_CHECK in names) == patched and (MARKER in names) == (
            FRAUD_CHECK in names
        )

    ok = all(took(infos[instance_id], False) for instance_id in old_ids)
    ok = ok and all(took(infos[instance_id], True) for instance_id in new_ids)
    if ok:
        console.print(
            f"[bold]{len(ids)}/{len(ids)} complete[/bold]: the orders asleep at the deploy finished on "
            f"the old path, the new ones recorded {MARKER} and ran {FRAUD_CHECK}"
        )
    return ok


def main() -> int:
    """Load settings, migrate, run the scenario; returns the exit code."""
    run_id = f"patch-{secrets.token_hex(3)}"
    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"live_patch: {exc}", file=sys.stderr)
        return 2
    console = Console()
    if not console.is_terminal:
        console.width = max(console.width, 120)
    console.print(f"[bold]Stepline live patch[/bold] run {run_id}")
    try:
        stores.upgrade(settings.database)
    except Exception as exc:  # the driver's errors vary; one line is what the user needs
        first_line = next(iter(str(exc).splitlines()), "")
        print(f"live_patch: migration failed: {type(exc).__name__}: {first_line}", file=sys.stderr)
        return 1
    log_dir = Path(tempfile.mkdtemp(prefix=f"stepline-{run_id}-"))
    console.print(f"process logs: {log_dir}")
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    services: list[Service] = []
    try:
        ok = asyncio.run(scenario(console, settings, run_id, log_dir, services))
        if not ok:
            console.print("[red]live patch failed[/red]")
            print_log_tails(console, services)
        return 0 if ok else 1
    except KeyboardInterrupt:
        console.print(f"[red]interrupted; process logs are in {log_dir}[/red]")
        return 130
    except Exception as exc:
        console.print(f"[red]live patch failed: {type(exc).__name__}: {exc}[/red]")
        print_log_tails(console, services)
        return 1
    finally:
        stop_fleet(console, services)


if __name__ == "__main__":
    sys.exit(main())
