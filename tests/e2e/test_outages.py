"""Outages of the broker or the database: every process that logs one's start logs its end.

The processes reach RabbitMQ or PostgreSQL through a ``Proxy`` of the test's
own, which blocks (as a memory alarm blocks publishers) or cuts (as a server
that went away); the shared servers are never touched.
"""

from __future__ import annotations

import json
import re

import pytest

from stepline import Client, Producer
from stepline.shared.settings import Settings
from tests.support.db import scalar
from tests.support.fleet import ProcessFleet
from tests.support.polling import eventually
from tests.support.proxy import Proxy

pytestmark = pytest.mark.e2e

PROCESSES = ("worker-1", "worker-2", "scheduler")
OUTBOX_TABLE = re.compile(r": (sweep|delete): ")
"""In the line of an outage of the outbox table: every process sweeps it twice a second."""
ANY = re.compile("")
STARTED = re.compile(r"^(?P<what>.+) is failing, retrying with back-off")
ENDED = re.compile(r"^(?P<what>.+) is back after")


def _entries(log: str) -> list[dict[str, str]]:
    """The JSON lines of a process's log (a crash's traceback is text)."""
    return [json.loads(line) for line in log.splitlines() if line.startswith("{")]


def _outage_events(log: str) -> list[tuple[str, str]]:
    """``(event, what)`` of each outage line of a JSON log, in order."""
    events = []
    for entry in _entries(log):
        for event, pattern in (("outage_started", STARTED), ("outage_ended", ENDED)):
            match = pattern.match(entry["message"])
            if entry.get("event") == event and match:
                events.append((event, match["what"]))
    return events


def _started(log: str) -> list[str]:
    """The lines of the outages a process logged the start of."""
    return [entry["message"] for entry in _entries(log) if entry.get("event") == "outage_started"]


def _still_open(log: str) -> set[str]:
    """The outages whose last line is a start: no end was logged after it."""
    last: dict[str, str] = {}
    for event, what in _outage_events(log):
        last[what] = event
    return {what for what, event in last.items() if event == "outage_started"}


def _start_fleet(fleet: ProcessFleet, **urls: str) -> None:
    """Two workers and a scheduler, logging JSON, reaching the given services through the proxy."""
    fleet.env.update(STEPLINE_LOG_FORMAT="json", **urls)
    fleet.start("worker-1", "stepline-worker", "--workflows", "tests.workflows")
    fleet.start("worker-2", "stepline-worker", "--workflows", "tests.workflows")
    fleet.start("scheduler", "stepline-scheduler")


async def _until_running(fleet: ProcessFleet) -> None:
    async def starting() -> list[str]:
        ready = {"worker_started", "scheduler_started"}
        return [
            name for name in PROCESSES if not any(e.get("event") in ready for e in _entries(fleet.log(name)))
        ]

    await eventually(starting, check=lambda waiting: not waiting, timeout=60, what="every process started")


async def _until_every_process_logged_an_outage(fleet: ProcessFleet, *, about: re.Pattern[str] = ANY) -> None:
    """Until each process logged the start of an outage (whose line matches ``about``)."""

    async def silent() -> list[str]:
        return [
            name for name in PROCESSES if not any(about.search(line) for line in _started(fleet.log(name)))
        ]

    await eventually(
        silent, check=lambda left: not left, timeout=60, what="an outage_started in every process"
    )


async def _until_complete(client: Client, ids: list[str]) -> None:
    async def unfinished() -> list[tuple[str, str | None]]:
        infos = [(instance_id, await client.get(instance_id)) for instance_id in ids]
        return [
            (i, None if info is None else str(info.status))
            for i, info in infos
            if info is None or info.status != "complete"
        ]

    await eventually(unfinished, check=lambda left: not left, timeout=90, what="every instance complete")


async def _until_every_outage_ended(fleet: ProcessFleet) -> None:
    async def still_open() -> dict[str, set[str]]:
        return {name: left for name in PROCESSES if (left := _still_open(fleet.log(name)))}

    await eventually(
        still_open, check=lambda left: not left, timeout=30, what="an outage_ended for every start"
    )


@pytest.mark.timeout(240)
async def test_a_blocked_broker_is_logged_as_back_by_every_process_that_logged_it_failing(
    settings: Settings, process_fleet: ProcessFleet, producer: Producer, client: Client
) -> None:
    with Proxy.to_url(settings.amqp) as proxy:
        try:
            _start_fleet(process_fleet, STEPLINE_AMQP_URL=proxy.url(settings.amqp))
            await _until_running(process_fleet)
            # Publishes hang as in a memory alarm; deliveries still reach the workers (up to
            # their prefetch) and timers still fire, so every process has something to publish.
            proxy.block()
            ids = [await producer.start("parallel") for _ in range(20)]
            ids += [await producer.start("sleeper", {"duration": f"{100 * n}ms"}) for n in range(1, 21)]
            await _until_every_process_logged_an_outage(process_fleet)
            proxy.unblock()
            await _until_complete(client, ids)
            await _until_every_outage_ended(process_fleet)
        finally:
            process_fleet.stop_all()  # while the proxy still forwards: a clean stop


@pytest.mark.timeout(240)
async def test_a_cut_database_is_logged_as_back_by_every_process_that_logged_it_failing(
    settings: Settings, process_fleet: ProcessFleet, producer: Producer, client: Client
) -> None:
    with Proxy.to_url(settings.database) as proxy:
        try:
            _start_fleet(process_fleet, STEPLINE_DATABASE_URL=proxy.url(settings.database))
            await _until_running(process_fleet)
            ids = [await producer.start("two-slow-branches") for _ in range(10)]

            async def steps_running() -> int:
                """Steps whose code runs now (each records itself, then sleeps a second)."""
                return int(await scalar(settings.database, "SELECT count(*) FROM side_effects"))

            # Cut while steps run: their commits fail, and nothing is left for anyone to
            # publish after, so only a process's own proof can end its outage.
            await eventually(steps_running, check=lambda running: running >= 4, what="steps under way")
            proxy.cut()
            # Held until every process's outbox sweeper, which runs twice a second, has failed too.
            await _until_every_process_logged_an_outage(process_fleet, about=OUTBOX_TABLE)
            proxy.restore()
            await _until_complete(client, ids)
            await _until_every_outage_ended(process_fleet)
        finally:
            process_fleet.stop_all()
