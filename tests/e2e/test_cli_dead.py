"""``stepline dead list|show|replay|discard`` as an operator types them, on both brokers."""

from __future__ import annotations

import json

import pytest

from stepline import Client
from stepline.shared.settings import Settings
from stepline.shared.topology import routing_key
from tests.support import cli
from tests.support.amqp import dead_letter_count, publish_raw
from tests.support.fleet import Fleet, process_env
from tests.support.polling import eventually
from tests.workflows import sequence

pytestmark = [pytest.mark.e2e, pytest.mark.both_backends]

START_SEQUENCE = routing_key("start", "sequence")
UNKNOWN = json.dumps(
    {"v": 1, "kind": "start", "workflow": "counted", "instance_id": "late-<b>", "params": None}
).encode()


@pytest.fixture
def env(settings: Settings) -> dict[str, str]:
    return process_env(settings)


async def test_an_operator_lists_shows_replays_and_discards_dead_letters(
    env: dict[str, str], fleet: Fleet, settings: Settings, client: Client
) -> None:
    old = await fleet.start_worker(workflows={"sequence": sequence})
    headers = {"x-note": "line one\nline two \x1b[31mred"}
    for number, body in enumerate([b"{not json", UNKNOWN], start=1):
        await publish_raw(settings.amqp, settings.namespace, START_SEQUENCE, body, headers)
        await eventually(
            lambda: dead_letter_count(settings.amqp, settings.namespace),
            check=lambda n, number=number: n >= number,  # type: ignore[misc]
            what=f"dead letter {number}",
        )

    listed = (await cli.run(env, "stepline", "dead", "list", "--json")).json()
    assert [(letter["routing_key"], letter["size"]) for letter in listed] == [
        (START_SEQUENCE, 9),
        (START_SEQUENCE, len(UNKNOWN)),
    ]
    broken, unknown = (letter["id"] for letter in listed)
    assert listed[1]["reason"] == "unknown workflow 'counted' (this worker knows: sequence)"
    text = await cli.run(env, "stepline", "dead", "list")
    assert text.returncode == 0, text.stderr
    assert "dead letters, oldest first" in text.stdout
    assert text.stdout.index(broken) < text.stdout.index(unknown)
    assert "unknown workflow 'counted'" in text.stdout
    assert text.stdout.strip().splitlines()[-1] == "2 dead letters shown; 2 kept"

    shown = await cli.run(env, "stepline", "dead", "show", unknown)
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert lines[0] == f"dead letter {unknown}"
    assert "reason: unknown workflow 'counted' (this worker knows: sequence)" in lines
    assert f"routing key: {START_SEQUENCE}" in lines
    # One value per line, escaped: the header's line break and terminal escape are shown, not obeyed.
    assert "  x-note: line one\\nline two \\x1b[31mred" in lines
    assert "\x1b" not in shown.stdout
    printed_body = "\n".join(lines[lines.index("body:") + 1 :])
    assert json.loads(printed_body)["instance_id"] == "late-<b>"
    assert '  "workflow": "counted",' in lines
    raw = await cli.run(env, "stepline", "dead", "show", broken, "--json")
    assert (raw.json()["body"], raw.json()["is_json"]) == ("{not json", False)

    refused = await cli.run(env, "stepline", "dead", "replay")
    assert refused.returncode == 2 and "give one dead letter ID, or --all" in refused.stderr
    missing = await cli.run(env, "stepline", "dead", "discard", "no-such-id")
    assert missing.returncode == 1
    assert "no dead letter has id 'no-such-id'" in missing.stderr

    await fleet.stop(old)
    await fleet.start_worker()
    replayed = await cli.run(env, "stepline", "dead", "replay", "--all", "--reason", "unknown workflow")
    assert replayed.returncode == 0, replayed.stderr
    assert replayed.stdout.splitlines() == [f"{unknown}: replayed", "replayed 1 of 1 dead letters; 0 kept"]
    assert (await client.wait("late-<b>", timeout=30)).status == "complete"

    discarded = await cli.run(env, "stepline", "dead", "discard", "--all", "--json")
    assert discarded.json() == {"action": "discard", "matched": 1, "done": [broken], "failed": {}}
    empty = await cli.run(env, "stepline", "dead", "list")
    assert empty.stdout.strip() == "0 dead letters shown; 0 kept"
