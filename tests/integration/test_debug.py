"""`stepline debug ID`: replay one recorded instance in this process; no step runs, nothing is written."""

from __future__ import annotations

from pathlib import Path

import pytest

from stepline import Client, Producer
from stepline.shared.settings import Settings
from tests.support import cli, db
from tests.support.fleet import Fleet, process_env
from tests.support.polling import eventually

pytestmark = pytest.mark.both_backends

TABLES = ("instances", "steps", "step_attempts", "events", "timers", "outbox", "side_effects")


async def _everything(settings: Settings) -> dict[str, list[dict[str, object]]]:
    """Every row of the tables a replay could touch (side_effects: each real run of step code)."""
    return {table: await db.rows(settings.database, f"SELECT * FROM {table}") for table in TABLES}


async def test_a_completed_instance_replays_clean_naming_each_step(
    fleet: Fleet, producer: Producer, client: Client, settings: Settings
) -> None:
    await fleet.start_worker()
    instance_id = await producer.start("sequence", {"a": 4, "b": 5})
    assert (await client.wait(instance_id, timeout=30)).status == "complete"
    await fleet.stop_all()
    before = await _everything(settings)

    env = process_env(settings)
    result = await cli.run(env, "stepline", "debug", instance_id, "--workflows", "tests.workflows", "--json")
    report = result.json()
    assert (report["outcome"], report["matches_record"], report["diverged"]) == ("returned", True, False)
    result = await cli.run(env, "stepline", "debug", instance_id, "--workflows", "tests.workflows")
    assert result.returncode == 0, result
    assert result.stdout.splitlines() == [
        f"{instance_id} (sequence, complete) replayed against tests.workflows: "
        "no step ran, nothing was written",
        "  1. step 'add': succeeded: {\"value\": 9}",
        "  2. step 'multiply': succeeded: 90",
        "  3. step 'describe': succeeded: \"result=90\"",
        'the workflow returned {"total": 9, "product": 90, "text": "result=90"} (as recorded)',
    ]
    missing = await cli.run(env, "stepline", "debug", "no-such-id", "--workflows", "tests.workflows")
    assert missing.returncode == 2, missing
    assert "no instance 'no-such-id'" in missing.stderr
    assert await _everything(settings) == before


async def test_a_changed_workflow_reports_where_code_and_history_part_ways(
    fleet: Fleet, producer: Producer, client: Client, settings: Settings
) -> None:
    await fleet.start_worker()
    instance_id = await producer.start("evolving", None)

    async def status() -> str | None:
        info = await client.get(instance_id)
        return info.status if info else None

    await eventually(status, check=lambda found: found == "waiting", what="the day-long sleep")
    await fleet.stop_all()
    before = await _everything(settings)
    env = process_env(settings)

    same = await cli.run(env, "stepline", "debug", instance_id, "--workflows", "tests.workflows")
    assert same.returncode == 0, same
    assert same.stdout.splitlines()[1:] == [
        "  1. step 'a': succeeded: \"A\"",
        "  2. sleep 'pause': waiting: null",
        "the history ends here: the workflow waits on sleep 'pause'",
    ]

    changed = await cli.run(env, "stepline", "debug", instance_id, "--workflows", "tests.deploys.breaking")
    assert changed.returncode == 1, changed
    assert changed.stdout.splitlines()[-1] == (
        "the code and the history part ways: the history holds sleep 'pause' at position 2, "
        "but the code asked for step 'c'"
    )
    assert await _everything(settings) == before  # not held, nothing run, nothing written


async def test_pdb_stops_at_the_workflow_with_the_recorded_results(
    fleet: Fleet, producer: Producer, client: Client, settings: Settings
) -> None:
    await fleet.start_worker()
    instance_id = await producer.start("sequence", {"a": 4, "b": 5})
    assert (await client.wait(instance_id, timeout=30)).status == "complete"
    result = await cli.run(
        process_env(settings),
        "stepline",
        "debug",
        instance_id,
        "--workflows",
        "tests.workflows",
        "--pdb",
        stdin="next\np ('seen', total)\ncontinue\n",
    )
    assert result.returncode == 0, result
    assert 'total = await ctx.step("add", add, params.a, params.b)' in result.stdout
    # Stopped at the first line, one "next" ran the step from the history: its recorded result.
    assert f"tests/workflows.py({_line_of('product = await ctx.step(')})sequence()" in result.stdout
    assert "(Pdb) ('seen', Total(value=9))" in result.stdout
    assert result.stdout.splitlines()[-1].endswith("(as recorded)")


def _line_of(code: str) -> int:
    """The number of the line of tests/workflows.py that holds ``code`` (the file moves as it grows)."""
    lines = (Path(__file__).parents[1] / "workflows.py").read_text().splitlines()
    return next(number for number, line in enumerate(lines, start=1) if code in line)
