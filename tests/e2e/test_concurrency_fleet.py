"""Instance concurrency on real worker processes: the limit per key, keys interleave, priority orders."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from datetime import datetime

import pytest

from stepline import Client, Producer
from stepline.shared.settings import Settings
from tests.support import db
from tests.support.fleet import ProcessFleet, until_consuming
from tests.support.polling import eventually, until_status

pytestmark = pytest.mark.e2e

LANES = ("red", "green", "blue")


def _most_at_once(intervals: list[tuple[datetime, datetime]]) -> int:
    """The largest number of intervals that overlap at one moment (an end before a start at a tie)."""
    edges = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    running = most = 0
    for _, change in edges:
        running += change
        most = max(most, running)
    return most


async def test_two_per_key_across_three_workers_and_no_key_waits_for_another(
    process_fleet: ProcessFleet,
    producer: Producer,
    client: Client,
    settings: Settings,
    workflows: Mapping[str, object],
) -> None:
    for number in (1, 2, 3):
        process_fleet.start(
            f"w{number}", "stepline-worker", "--workflows", "tests.workflows", "--worker-id", f"w{number}"
        )
    await until_consuming(settings, workflows, at_least=3)

    # 30 instances over 3 keys, published in an interleaved order.
    ids = [
        await producer.start(
            "per-lane", {"lane": LANES[number % 3], "work_ms": 150}, instance_id=f"lane-{number}"
        )
        for number in range(30)
    ]
    for instance_id in ids:
        info = await client.wait(instance_id, timeout=120)
        assert info.status == "complete", info

    rows = await db.rows(
        settings.database,
        "SELECT i.params ->> 'lane' AS lane, a.worker, a.started_at, a.finished_at"
        " FROM step_attempts a JOIN instances i ON i.id = a.instance_id WHERE i.workflow = 'per-lane'",
    )
    assert len(rows) == 30  # one attempt each: nothing ran twice
    by_lane: dict[str, list[tuple[datetime, datetime]]] = defaultdict(list)
    for row in rows:
        by_lane[row["lane"]].append((row["started_at"], row["finished_at"]))
    assert sorted(by_lane) == sorted(LANES)
    for lane, intervals in by_lane.items():
        assert _most_at_once(intervals) <= 2, (lane, sorted(intervals))
    # No key waits for another to drain: each has an instance done before any other's last one starts.
    for lane, intervals in by_lane.items():
        first_done = min(end for _, end in intervals)
        for other, others in by_lane.items():
            if other != lane:
                assert first_done < max(start for start, _ in others), (lane, other)
    assert len({row["worker"] for row in rows}) >= 2  # the limit held across workers, not within one


async def test_with_a_limit_of_one_queued_instances_start_by_priority_across_two_workers(
    process_fleet: ProcessFleet,
    producer: Producer,
    client: Client,
    settings: Settings,
    workflows: Mapping[str, object],
) -> None:
    for number in (1, 2):
        process_fleet.start(f"w{number}", "stepline-worker", "--workflows", "tests.workflows")
    await until_consuming(settings, workflows, at_least=2)
    current = await producer.start("gate", {"lane": "e2e"}, instance_id="e2e-holder")
    await until_status(client, current, "waiting")
    queued = [("e2e-p0-old", 0), ("e2e-p7", 7), ("e2e-p0-new", 0), ("e2e-p9", 9), ("e2e-p7-new", 7)]
    for instance_id, priority in queued:
        await producer.start("gate", {"lane": "e2e"}, instance_id=instance_id, priority=priority)
        await until_status(client, instance_id, "queued")

    order = []
    waiting = [instance_id for instance_id, _ in queued]
    while waiting:
        await client.send_event(current, "go")
        await until_status(client, current, "complete")

        async def started() -> list[str]:
            infos = [await client.get(instance_id) for instance_id in waiting]
            return [info.id for info in infos if info is not None and info.status != "queued"]

        found = await eventually(started, check=bool, what="the next queued instance to start")
        assert len(found) == 1, found  # a limit of one: one freed slot starts one
        current = found[0]
        order.append(current)
        waiting.remove(current)
        await until_status(client, current, "waiting")
    assert order == ["e2e-p9", "e2e-p7", "e2e-p7-new", "e2e-p0-old", "e2e-p0-new"]
