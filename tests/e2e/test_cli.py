"""The ``stepline`` and ``stepline-worker`` commands; what a process prints on its way out, in real ones."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator, Mapping

import pytest

from stepline import Client, Producer
from stepline.shared.db import migrate, revisions
from stepline.shared.settings import Settings
from tests.support import cli, services
from tests.support.amqp import connected_broker, dead_letter_count, ready_messages
from tests.support.fleet import ProcessFleet, process_env, until_consuming

pytestmark = pytest.mark.e2e


@pytest.fixture
def env(settings: Settings) -> dict[str, str]:
    """The environment a user of this test's database and namespace would set."""
    return process_env(settings)


@pytest.fixture
def empty_database() -> Iterator[str]:
    """A database with nothing in it, dropped after."""
    name = services.clone_database("template0")
    yield services.database_url(name)
    services.drop_database(name)


async def test_db_upgrade_migrates_and_prints_the_revision(env: dict[str, str], empty_database: str) -> None:
    head = revisions.head_revision()
    assert head is not None
    fresh = {**env, "STEPLINE_DATABASE_URL": empty_database}

    first = await cli.run(fresh, "stepline", "db", "upgrade")
    again = await cli.run(fresh, "stepline", "db", "upgrade")

    assert first.returncode == 0, first
    assert head in first.stdout
    assert migrate.current_revision(empty_database) == head
    assert again.returncode == 0, again
    assert head in again.stdout


async def test_db_upgrade_of_the_test_database_is_a_no_op(env: dict[str, str]) -> None:
    result = await cli.run(env, "stepline", "db", "upgrade")
    assert result.returncode == 0, result
    assert f"database at revision {revisions.head_revision()}" in result.stdout


async def test_start_run_and_inspect_an_instance(
    env: dict[str, str],
    process_fleet: ProcessFleet,
    client: Client,
    settings: Settings,
    workflows: Mapping[str, object],
) -> None:
    process_fleet.start("w1", "stepline-worker", "--workflows", "tests.workflows", "--worker-id", "w-cli")
    await until_consuming(settings, workflows)  # a start names a workflow a worker serves
    started = await cli.run(
        env, "stepline", "start", "sequence", "--params", '{"a":1,"b":2}', "--id", "cli-1", "--json"
    )
    assert started.json() == {"instance_id": "cli-1", "workflow": "sequence"}

    # Polled through the client library: each command run costs a second of interpreter start-up.
    await client.wait("cli-1", timeout=30)
    status, listed, history = await asyncio.gather(
        cli.run(env, "stepline", "status", "cli-1", "--json"),
        cli.run(env, "stepline", "list", "--json"),
        cli.run(env, "stepline", "history", "cli-1", "--json"),
    )

    info = status.json()
    assert info["status"] == "complete", info
    assert info["id"] == "cli-1"
    assert info["workflow"] == "sequence"
    assert info["params"] == {"a": 1, "b": 2}
    assert info["output"] == {"total": 3, "product": 30, "text": "result=30"}
    assert [(step["name"], step["status"]) for step in info["steps"]] == [
        ("add", "succeeded"),
        ("multiply", "succeeded"),
        ("describe", "succeeded"),
    ]

    assert [(item["id"], item["status"]) for item in listed.json()] == [("cli-1", "complete")]
    assert history.json()["instance"]["id"] == "cli-1"
    assert [(a["step"], a["attempt"], a["worker"], a["outcome"]) for a in history.json()["attempts"]] == [
        ("add", 1, "w-cli", "succeeded"),
        ("multiply", 1, "w-cli", "succeeded"),
        ("describe", 1, "w-cli", "succeeded"),
    ]


async def test_status_of_an_unknown_id_fails_naming_it(env: dict[str, str]) -> None:
    result, history = await asyncio.gather(
        cli.run(env, "stepline", "status", "nope"), cli.run(env, "stepline", "history", "nope", "--json")
    )
    assert result.returncode != 0
    assert "no instance has id 'nope' yet" in result.output
    assert history.returncode != 0
    assert "no instance has id 'nope' yet" in history.output


@pytest.mark.both_backends
async def test_a_start_no_worker_serves_is_refused_unless_allowed_and_status_says_it_may_be_queued(
    env: dict[str, str], settings: Settings, backend: str
) -> None:
    refused = await cli.run(env, "stepline", "start", "no-such", "--params", "{}", "--id", "typo")

    assert refused.returncode == 1, refused
    assert refused.stdout == ""
    assert refused.stderr.strip() == (
        f"Error: workflow 'no-such' is not registered in namespace {settings.namespace!r} "
        "(no worker serving it has run there); nothing was published. Check the name, "
        "or pass allow_unregistered=True (stepline start --allow-unregistered) "
        "to queue the start until a worker serving it runs"
    )
    async with connected_broker(settings.amqp, settings.namespace) as broker:
        assert await broker.workflow_queue("no-such") is None
    assert await dead_letter_count(settings.amqp, settings.namespace) == 0

    queued = await cli.run(
        env, "stepline", "start", "no-such", "--params", "{}", "--id", "later", "--allow-unregistered"
    )

    assert queued.returncode == 0, queued
    assert queued.stdout.strip() == "later"
    if backend == "postgres":  # another process cannot count the embedded file's consumers: no note
        assert queued.stderr.strip() == (
            "note: no worker serving 'no-such' runs now; the start waits in its queue until one does"
        )
    assert await ready_messages(settings.amqp, settings.namespace, "no-such") == 1

    status = await cli.run(env, "stepline", "status", "later")

    assert status.returncode == 1, status
    assert status.stderr.strip() == (
        "Error: no instance has id 'later' yet; if a start with this id was published, "
        "it is still queued until a worker serving its workflow takes it"
    )


async def test_start_with_params_that_are_not_json_is_a_usage_error(env: dict[str, str]) -> None:
    result = await cli.run(env, "stepline", "start", "sequence", "--params", "{a: 1")
    assert result.returncode == 2, result
    assert "--params" in result.stderr
    assert "not JSON" in result.stderr


async def test_start_with_invalid_instance_id_fails_cleanly(env: dict[str, str]) -> None:
    result = await cli.run(env, "stepline", "start", "sequence", "--params", "{}", "--id", "x" * 600)
    assert result.returncode != 0
    assert "instance id 'xxx" in result.stderr
    assert "is 600 characters, over the limit of 512" in result.stderr
    assert "Traceback" not in result.output


async def test_worker_with_bad_settings_exits_2_naming_every_variable(env: dict[str, str]) -> None:
    bad = {key: value for key, value in env.items() if key != "STEPLINE_DATABASE_URL"}
    bad["STEPLINE_AMQP_URL"] = "http://x"

    result = await cli.run(bad, "stepline-worker", "--workflows", "tests.workflows")

    assert result.returncode == 2, result
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert "STEPLINE_DATABASE_URL" in lines[0]
    assert "STEPLINE_AMQP_URL" in lines[0]
    assert "http://x" not in lines[0]


async def test_amqp_password_never_appears_in_output(env: dict[str, str]) -> None:
    secret = {**env, "STEPLINE_AMQP_URL": "amqp://guest:s3cr3t-pw@127.0.0.1:1/nope"}

    result = await cli.spawn(secret, "stepline", "start", "sequence", "--params", '{"a":1,"b":2}')

    assert result.returncode != 0
    assert "s3cr3t-pw" not in result.output
    assert "cannot connect to RabbitMQ" in result.output
    assert "Traceback" not in result.output


async def test_database_password_never_appears_in_output(env: dict[str, str]) -> None:
    secret = {**env, "STEPLINE_DATABASE_URL": "postgresql://postgres:s3cr3t-db@127.0.0.1:1/nope"}

    status, upgrade = await asyncio.gather(
        cli.spawn(secret, "stepline", "status", "anything"), cli.spawn(secret, "stepline", "db", "upgrade")
    )

    for result in (status, upgrade):
        assert result.returncode != 0, result
        assert "s3cr3t-db" not in result.output
    assert "postgresql://postgres:***@127.0.0.1:1/nope" in upgrade.stderr


@pytest.mark.parametrize("command", [("status", "x"), ("history", "x"), ("list",)], ids=lambda c: c[0])
async def test_unreachable_database_is_one_clear_error_not_a_traceback(
    env: dict[str, str], command: tuple[str, ...]
) -> None:
    down = {**env, "STEPLINE_DATABASE_URL": "postgresql://postgres@127.0.0.1:1/nope"}

    result = await cli.spawn(down, "stepline", *command)

    assert result.returncode == 1, result
    assert "Traceback" not in result.output, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert "127.0.0.1" in lines[0]


ID_ERROR = "Error: instance id 'a\\nb' holds a control character (\\n at position 1): ids are printable text"


@pytest.mark.parametrize(
    ("command", "error"),
    [
        (("start", "sequence", "--id", "a\nb"), ID_ERROR),
        (("status", "a\nb"), ID_ERROR),
        (("history", "a\nb", "--json"), ID_ERROR),
        (("pause", "a\nb"), ID_ERROR),
        (("terminate", "a\nb"), ID_ERROR),
        (("send-event", "a\nb", "paid"), ID_ERROR),
        (
            ("send-event", "ok", "paid", "--event-id", "e\x1b[2J"),
            "Error: event id 'e\\x1b[2J' holds a control character (\\x1b at position 1): "
            "ids are printable text",
        ),
        (("list", "--prefix", "a\u2028"), "Error: id prefix 'a\\u2028' holds a line separator"),
    ],
    ids=["start", "status", "history", "pause", "terminate", "send-event", "event-id", "list-prefix"],
)
async def test_an_id_with_a_control_character_is_one_line_of_error(
    env: dict[str, str], command: tuple[str, ...], error: str
) -> None:
    result = await cli.run(env, "stepline", *command)

    assert result.returncode == 1, result
    assert result.stdout == ""
    assert result.stderr.splitlines() == [result.stderr.rstrip("\n")]  # one line
    assert result.stderr.startswith(error), result.stderr


ODD_TEXT = "frist\nsceond [red]x[/red] :x:"
"""A step error message with a line break, rich markup and an emoji code: shown as written, escaped."""
ODD_SHOWN = "frist\\nsceond [red]x[/red] :x:"


@pytest.mark.both_backends
async def test_what_a_workflow_wrote_is_printed_escaped_one_line_per_row(
    env: dict[str, str],
    process_fleet: ProcessFleet,
    client: Client,
    settings: Settings,
    workflows: Mapping[str, object],
) -> None:
    process_fleet.start("w1", "stepline-worker", "--workflows", "tests.workflows")
    await until_consuming(settings, workflows)  # a start names a workflow a worker serves
    odd_id = "odd [bold]1[/bold]"
    started = await cli.run(
        env, "stepline", "start", "odd-text", "--params", json.dumps(ODD_TEXT), "--id", odd_id
    )
    assert started.returncode == 0, started
    assert (await client.wait(odd_id, timeout=30)).status == "errored"

    status, history, listed = await asyncio.gather(
        cli.run(env, "stepline", "status", odd_id),
        cli.run(env, "stepline", "history", odd_id),
        cli.run(env, "stepline", "list"),
    )

    for result in (status, history, listed):
        assert result.returncode == 0, result
        assert "Traceback" not in result.output
        # Every line that shows part of the message shows all of it: no row was split.
        parts = [line for line in result.stdout.splitlines() if "frist" in line or "sceond" in line]
        assert all(ODD_SHOWN in line for line in parts), result.stdout
    for result in (status, history):
        assert result.stdout.splitlines()[0] == f"{odd_id}  odd-text  errored", result.stdout
        step_rows = [line for line in result.stdout.splitlines() if line.startswith("│ say [bold]it[/bold] ")]
        assert len(step_rows) == (1 if result is status else 2), result.stdout  # steps (+ attempts)
        assert all(f"NonRetryableError: {ODD_SHOWN}" in row for row in step_rows), result.stdout
    assert "error: StepFailedError: step 'say [bold]it[/bold]' failed after 1 attempt" in status.stdout
    assert [line for line in listed.stdout.splitlines() if odd_id in line], listed.stdout


async def test_list_filters_match_exactly(
    env: dict[str, str],
    process_fleet: ProcessFleet,
    producer: Producer,
    client: Client,
    settings: Settings,
    workflows: Mapping[str, object],
) -> None:
    process_fleet.start("w1", "stepline-worker", "--workflows", "tests.workflows")
    await until_consuming(settings, workflows)
    for instance_id in ("cli_1", "cli%2", "CLI-3", "clix4"):
        await producer.start("sequence", {"a": 1, "b": 2}, instance_id=instance_id)
    for instance_id in ("cli_1", "cli%2", "CLI-3", "clix4"):
        await client.wait(instance_id, timeout=30)

    wildcard, prefix, underscore, helped = await asyncio.gather(
        cli.run(env, "stepline", "list", "--workflow", "%", "--json"),
        cli.run(env, "stepline", "list", "--prefix", "cli", "--json"),
        cli.run(env, "stepline", "list", "--prefix", "cli_", "--json"),
        cli.run(env, "stepline", "list", "--help"),
    )

    assert wildcard.json() == []
    assert {item["id"] for item in prefix.json()} == {"cli_1", "cli%2", "clix4"}
    assert [item["id"] for item in underscore.json()] == ["cli_1"]
    help_text = " ".join(helped.stdout.split())  # click wraps it
    assert (
        "--workflow TEXT Only this workflow: its exact name (no wildcards; '%' is a character)." in help_text
    )
    assert "Only this status, matched exactly." in help_text
    assert "--prefix TEXT Only ids that start with this text: exact and case-sensitive" in help_text


async def test_status_history_and_list_show_the_build_that_ran_an_instance(
    env: dict[str, str],
    process_fleet: ProcessFleet,
    producer: Producer,
    client: Client,
    settings: Settings,
    workflows: Mapping[str, object],
) -> None:
    process_fleet.env = {**env, "STEPLINE_WORKER__BUILD_ID": "cli-v1"}
    process_fleet.start("w1", "stepline-worker", "--workflows", "tests.workflows", "--worker-id", "w-build")
    await until_consuming(settings, workflows)
    await producer.start("sequence", {"a": 1, "b": 2}, instance_id="built-1")
    await client.wait("built-1", timeout=30)

    status, status_json, history, of_build, of_other = await asyncio.gather(
        cli.run(env, "stepline", "status", "built-1"),
        cli.run(env, "stepline", "status", "built-1", "--json"),
        cli.run(env, "stepline", "history", "built-1"),
        cli.run(env, "stepline", "list", "--build", "cli-v1", "--json"),
        cli.run(env, "stepline", "list", "--build", "cli-v2", "--json"),
    )

    assert status.returncode == 0, status
    assert "started by build cli-v1" in status.stdout
    assert status_json.json()["build_id"] == "cli-v1"
    assert history.returncode == 0, history
    assert "started by build cli-v1" in history.stdout
    attempt_rows = [line for line in history.stdout.splitlines() if "w-build" in line]
    assert len(attempt_rows) == 3, history.stdout
    assert all("cli-v1" in row for row in attempt_rows), history.stdout
    assert [(item["id"], item["build_id"]) for item in of_build.json()] == [("built-1", "cli-v1")]
    assert of_other.json() == []
