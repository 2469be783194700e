"""Schedules with real processes: two schedulers, one SIGKILLed; both stopped and caught up; the CLI."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

import pytest

from stepline import Client
from stepline.shared.settings import Settings
from tests.support import cli
from tests.support.fleet import ProcessFleet, process_env, terminate, until_consuming
from tests.support.polling import eventually

pytestmark = [pytest.mark.e2e, pytest.mark.both_backends]

WORKER = ("stepline-worker", "--workflows", "tests.schedule_workflows")
STARTED = re.compile(r"schedule '(?P<schedule>[^']+)' started (?P<id>\S+)")


def _tick(instance_id: str) -> datetime:
    return datetime.strptime(instance_id.split("@", 1)[1], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)


async def _ticks(client: Client, prefix: str) -> list[datetime]:
    return sorted(_tick(info.id) for info in await client.list(id_prefix=prefix, limit=10_000))


async def _now() -> datetime:
    """The clock (the database's clock, on this machine, is the same)."""
    return datetime.now(UTC)


async def test_two_schedulers_one_sigkilled_start_one_instance_per_tick(
    process_fleet: ProcessFleet, client: Client, settings: Settings
) -> None:
    process_fleet.start("worker", *WORKER, "--worker-id", "w1")
    await until_consuming(settings, ["every-second", "held-open", "nightly-report"])
    process_fleet.start("s1", "stepline-scheduler")
    process_fleet.start("s2", "stepline-scheduler")
    # The worker declared "tick" (every second); wait for a few of its starts, then kill s1.
    await eventually(lambda: _ticks(client, "tick@"), check=lambda t: len(t) >= 4, timeout=60, what="4 ticks")
    process_fleet.kill("s1")
    killed_at = (await _ticks(client, "tick@"))[-1]
    await eventually(
        lambda: _ticks(client, "tick@"),
        check=lambda t: bool(t) and t[-1] >= killed_at + timedelta(seconds=6),
        timeout=60,
        what="6 more ticks after the kill",
    )
    terminate(process_fleet.processes["s2"])

    ticks = await _ticks(client, "tick@")
    # One instance per tick (ids are the ticks), none missing between the first and the last.
    assert ticks == [ticks[0] + timedelta(seconds=n) for n in range(len(ticks))], ticks
    # None fired twice: each start was committed by exactly one scheduler.
    fired = [
        match["id"]
        for name in ("s1", "s2")
        for match in STARTED.finditer(process_fleet.log(name))
        if match["schedule"] == "tick"
    ]
    assert len(fired) == len(set(fired)), sorted(fired)
    assert "started tick@" in process_fleet.log("s2")


async def test_catch_up_latest_after_both_schedulers_were_stopped(
    process_fleet: ProcessFleet, client: Client, settings: Settings
) -> None:
    env = process_env(settings)
    process_fleet.start("worker", *WORKER, "--worker-id", "w1")
    await until_consuming(settings, ["every-second", "held-open", "nightly-report"])
    created = await cli.run(
        env,
        "stepline",
        "schedule",
        "create",
        "latest",
        "every-second",
        "--cron",
        "* * * * * *",
        "--overlap",
        "allow",
        "--catch-up",
        "latest",
        "--json",
    )
    assert created.json()["catch_up"] == "latest"
    await cli.run(env, "stepline", "schedule", "pause", "tick")  # only "latest" fires here
    for name in ("s1", "s2"):
        process_fleet.start(name, "stepline-scheduler")
    await eventually(lambda: _ticks(client, "latest@"), check=lambda t: len(t) >= 2, timeout=60, what="ticks")
    for name in ("s1", "s2"):
        terminate(process_fleet.processes[name])
    # The last start they fired may still be on its way to the worker: wait for its instance.
    last = (await client.get_schedule("latest")).last_instance_id
    assert last is not None
    await eventually(lambda: client.get(last), what="the last start's instance")
    before = await _ticks(client, "latest@")
    assert before[-1] == _tick(last)
    # Both down while five ticks pass (by the database's clock).
    stopped_at = before[-1]
    await eventually(_now, check=lambda now: now >= stopped_at + timedelta(seconds=6), what="5 ticks")
    assert await _ticks(client, "latest@") == before
    process_fleet.start("s3", "stepline-scheduler")
    await eventually(
        lambda: _ticks(client, "latest@"),
        check=lambda t: len(t) >= len(before) + 3,
        timeout=60,
        what="restart",
    )
    terminate(process_fleet.processes["s3"])
    after = (await _ticks(client, "latest@"))[len(before) :]
    # One start for the missed ticks (the latest of them), then one per tick again.
    assert after[0] >= stopped_at + timedelta(seconds=6)
    assert after == [after[0] + timedelta(seconds=n) for n in range(len(after))]


async def test_the_schedule_commands(process_fleet: ProcessFleet, client: Client, settings: Settings) -> None:
    env = process_env(settings)
    process_fleet.start("worker", *WORKER, "--worker-id", "w1")
    await until_consuming(settings, ["every-second", "held-open", "nightly-report"])

    unregistered = await cli.run(
        env, "stepline", "schedule", "create", "nightly", "nightly-reprot", "--cron", "0 2 * * *"
    )
    assert unregistered.returncode == 1
    assert "'nightly-reprot'" in unregistered.stderr and "registered" in unregistered.stderr
    bad_cron = await cli.run(
        env, "stepline", "schedule", "create", "nightly", "held-open", "--cron", "0 25 * * *"
    )
    assert bad_cron.returncode == 1
    assert "schedule 'nightly' of workflow 'held-open': cron '0 25 * * *' does not parse" in bad_cron.stderr
    bad_zone = await cli.run(
        env,
        "stepline",
        "schedule",
        "create",
        "nightly",
        "held-open",
        "--cron",
        "0 2 * * *",
        "--timezone",
        "Berlin",
    )
    assert "timezone 'Berlin' is not a known IANA time zone" in bad_zone.stderr
    bad_overlap = await cli.run(
        env,
        "stepline",
        "schedule",
        "create",
        "nightly",
        "held-open",
        "--cron",
        "0 2 * * *",
        "--overlap",
        "never",
    )
    assert (
        bad_overlap.returncode == 2
        and "'never' is not one of 'skip', 'allow', 'buffer-one'" in bad_overlap.stderr
    )

    created = await cli.run(
        env,
        "stepline",
        "schedule",
        "create",
        "nightly",
        "held-open",
        "--cron",
        "0 2 * * *",
        "--timezone",
        "Europe/Berlin",
    )
    assert created.returncode == 0, created
    assert created.stdout.startswith("nightly: held-open at '0 2 * * *' (Europe/Berlin), next ")
    listed = {
        item["id"]: item for item in (await cli.run(env, "stepline", "schedule", "list", "--json")).json()
    }
    assert len(listed["nightly"]["next_fire_times"]) == 5
    assert listed["nightly-report"]["source"] == "code"
    table = await cli.run(env, "stepline", "schedule", "list")
    assert "nightly" in table.stdout and "Europe/Berlin" in table.stdout

    paused = (await cli.run(env, "stepline", "schedule", "pause", "nightly", "--json")).json()
    assert paused["paused"] is True and paused["next_fire_times"] == []
    resumed = await cli.run(env, "stepline", "schedule", "resume", "nightly")
    assert resumed.returncode == 0 and "next " in resumed.stdout
    triggered = (await cli.run(env, "stepline", "schedule", "trigger", "nightly", "--json")).json()
    assert re.fullmatch(r"nightly@\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", triggered["instance_id"])
    await eventually(lambda: client.get(triggered["instance_id"]), what="the triggered instance")
    deleted = await cli.run(env, "stepline", "schedule", "delete", "nightly")
    assert deleted.stdout.strip() == "nightly: deleted"
    gone = await cli.run(env, "stepline", "schedule", "delete", "nightly")
    assert gone.returncode == 1 and "no schedule with id 'nightly'" in gone.stderr
