"""``stepline start --priority``: checked before anything is sent; shown by ``status`` and ``list``."""

from __future__ import annotations

from collections.abc import Mapping

import pytest

from stepline import Client
from stepline.shared.settings import Settings
from tests.support import cli
from tests.support.fleet import ProcessFleet, process_env, until_consuming
from tests.support.polling import until_status

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize(
    ("value", "complaint"),
    [
        ("10", "10 is not in the range 0<=x<=9"),
        ("-1", "-1 is not in the range 0<=x<=9"),
        ("x", "'x' is not a valid integer"),
    ],
)
async def test_a_priority_outside_0_to_9_is_a_usage_error(
    settings: Settings, value: str, complaint: str
) -> None:
    result = await cli.run(process_env(settings), "stepline", "start", "gate", "--priority", value)
    assert result.returncode == 2, result
    assert "Invalid value for '--priority'" in result.stderr
    assert complaint in result.stderr
    assert "Traceback" not in result.output


async def test_a_start_with_a_priority_shows_it_in_status_and_list(
    process_fleet: ProcessFleet, client: Client, settings: Settings, workflows: Mapping[str, object]
) -> None:
    env = process_env(settings)
    process_fleet.start("w1", "stepline-worker", "--workflows", "tests.workflows")
    await until_consuming(settings, workflows)

    started = await cli.run(
        env, "stepline", "start", "gate", "--params", '{"lane": "cli"}', "--id", "cli-7", "--priority", "7"
    )
    assert started.returncode == 0, started
    await until_status(client, "cli-7", "waiting")  # for its "go": read as it stands
    status = await cli.run(env, "stepline", "status", "cli-7", "--json")
    listed = await cli.run(env, "stepline", "list", "--workflow", "gate", "--json")
    plain = await cli.run(env, "stepline", "status", "cli-7")

    assert status.json()["priority"] == 7
    assert status.json()["concurrency_key"] == "cli"
    assert [(item["id"], item["priority"]) for item in listed.json()] == [("cli-7", 7)]
    assert "priority 7  concurrency key 'cli'" in plain.stdout
