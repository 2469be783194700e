"""The read side of the client: get, list, wait and attempts, as a user of it checks them."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest

from stepline import Client, Producer
from stepline.shared.errors import InvalidIdError, WaitTimeoutError
from tests.support.fleet import Fleet
from tests.support.polling import eventually

pytestmark = pytest.mark.both_backends


async def test_get_of_an_unknown_id_is_none(client: Client) -> None:
    assert await client.get("no-such-instance") is None


async def test_list_filters_by_workflow_and_status_newest_first(
    fleet: Fleet, producer: Producer, client: Client
) -> None:
    await fleet.start_worker()
    started: list[tuple[str, str, object]] = [
        ("seq-1", "sequence", {"a": 1, "b": 1}),
        ("refused", "non-retryable", None),
        ("seq-2", "sequence", {"a": 2, "b": 2}),
        ("seq-3", "sequence", {"a": 3, "b": 3}),
    ]
    for instance_id, workflow, params in started:
        # One at a time, so that creation order is the order above.
        await producer.start(workflow, params, instance_id=instance_id)
        await client.wait(instance_id, timeout=30)

    everything = await client.list()
    sequences = await client.list(workflow="sequence")
    errored = await client.list(status="errored")
    complete_sequences = await client.list(workflow="sequence", status="complete")
    newest_two = await client.list(limit=2)

    assert [info.id for info in everything] == ["seq-3", "seq-2", "refused", "seq-1"]
    assert [info.id for info in sequences] == ["seq-3", "seq-2", "seq-1"]
    assert [(info.id, info.status) for info in errored] == [("refused", "errored")]
    assert [info.id for info in complete_sequences] == ["seq-3", "seq-2", "seq-1"]
    assert [info.id for info in newest_two] == ["seq-3", "seq-2"]
    assert await client.list(workflow="non-retryable", status="complete") == []
    assert await client.list(workflow="no-such-workflow") == []
    assert everything[0].output == {"total": 6, "product": 60, "text": "result=60"}
    created = [info.created_at for info in everything]
    assert created == sorted(created, reverse=True)


async def test_list_with_a_status_that_does_not_exist_raises(client: Client) -> None:
    with pytest.raises(ValueError, match="finished"):
        await client.list(status="finished")


async def test_wait_for_an_id_that_never_starts_times_out(client: Client) -> None:
    with pytest.raises(WaitTimeoutError, match="not yet created") as raised:
        await client.wait("never-started", timeout=0.5)
    assert raised.value.instance_id == "never-started"
    assert raised.value.status is None
    assert "'never-started'" in str(raised.value)


async def test_wait_timeout_names_the_current_status(
    fleet: Fleet, producer: Producer, client: Client
) -> None:
    await fleet.start_worker()
    instance_id = await producer.start("sleeper", {"duration": "1 hour"}, instance_id="napping")
    await eventually(
        lambda: client.get(instance_id),
        check=lambda info: info is not None and info.status == "waiting",
        what="the instance to sleep",
    )

    with pytest.raises(WaitTimeoutError, match=r"\(status: waiting\)"):
        await client.wait(instance_id, timeout="300ms")


async def test_attempts_name_the_worker_and_the_outcome(
    fleet: Fleet, producer: Producer, client: Client
) -> None:
    await fleet.start_worker(worker_id="w-a")
    fleet.start_scheduler()  # fires the retry back-off of the flaky step
    await producer.start("sequence", {"a": 1, "b": 2}, instance_id="seq")
    await producer.start("flaky", {"fail_times": 1}, instance_id="flaky")
    assert (await client.wait("seq", timeout=30)).status == "complete"
    assert (await client.wait("flaky", timeout=30)).status == "complete"

    sequence_attempts = await client.attempts("seq")
    flaky_attempts = await client.attempts("flaky")

    assert [(a.step, a.occurrence, a.attempt, a.worker, a.outcome) for a in sequence_attempts] == [
        ("add", 1, 1, "w-a", "succeeded"),
        ("multiply", 1, 1, "w-a", "succeeded"),
        ("describe", 1, 1, "w-a", "succeeded"),
    ]
    assert all(a.error is None and a.finished_at >= a.started_at for a in sequence_attempts)
    assert [(a.step, a.attempt, a.worker, a.outcome) for a in flaky_attempts] == [
        ("call", 1, "w-a", "failed"),
        ("call", 2, "w-a", "succeeded"),
    ]
    failed = flaky_attempts[0].error
    assert failed is not None
    assert failed["type"] == "ConnectionError"
    assert failed["message"] == "transient failure on attempt 1"
    assert await client.attempts("no-such-instance") == []


BAD_ID = "a\nb"
BAD_ID_ERROR = "instance id 'a\\nb' holds a control character (\\n at position 1): ids are printable text"


async def test_every_method_taking_an_id_refuses_a_control_character(client: Client) -> None:
    calls: dict[str, Callable[[], Awaitable[object]]] = {
        "get": lambda: client.get(BAD_ID),
        "attempts": lambda: client.attempts(BAD_ID),
        "events": lambda: client.events(BAD_ID),
        "recorded_values": lambda: client.recorded_values(BAD_ID),
        "wait": lambda: client.wait(BAD_ID, timeout=5),
        "pause": lambda: client.pause(BAD_ID),
        "resume": lambda: client.resume(BAD_ID),
        "terminate": lambda: client.terminate(BAD_ID),
        "restart": lambda: client.restart(BAD_ID),
        "send_event": lambda: client.send_event(BAD_ID, "paid"),
    }
    for name, call in calls.items():
        with pytest.raises(InvalidIdError) as raised:
            await call()
        assert str(raised.value) == BAD_ID_ERROR, name
    with pytest.raises(InvalidIdError, match=r"^event id 'e\\x1b\[1m' holds a control character"):
        await client.send_event("fine", "paid", event_id="e\x1b[1m")
    with pytest.raises(InvalidIdError, match=r"^id prefix 'a\\nb' holds a control character"):
        await client.list(id_prefix=BAD_ID)


# Ids that LIKE would confuse: '%' and '_' are wildcards to it, and SQLite's LIKE ignores case.
PREFIX_IDS = ["job%1", "job%%", "job_1", "jobx1", "Job%1", "JOB_2", "jo", "a\U0010ffffz", "b"]


async def test_list_by_id_prefix_is_exact_and_case_sensitive(
    fleet: Fleet, producer: Producer, client: Client
) -> None:
    await fleet.start_worker()
    for instance_id in PREFIX_IDS:
        await producer.start("sequence", {"a": 1, "b": 1}, instance_id=instance_id)
    await eventually(
        lambda: client.list(limit=100),
        check=lambda found: len(found) == len(PREFIX_IDS),
        what="every instance to be created",
    )

    async def ids(prefix: str) -> set[str]:
        return {info.id for info in await client.list(id_prefix=prefix, limit=100)}

    assert await ids("job%") == {"job%1", "job%%"}
    assert await ids("job_") == {"job_1"}
    assert await ids("job") == {"job%1", "job%%", "job_1", "jobx1"}
    assert await ids("Job") == {"Job%1"}
    assert await ids("JOB") == {"JOB_2"}
    assert await ids("jo") == {"jo", "job%1", "job%%", "job_1", "jobx1"}
    assert await ids("job%%") == {"job%%"}
    assert await ids("%") == set()
    assert await ids("_") == set()
    assert await ids("a\U0010ffff") == {"a\U0010ffffz"}  # no code point above it to bound the range
    assert await ids("") == set(PREFIX_IDS)
    page = [info.id for info in await client.list(id_prefix="job", limit=3)]
    assert len(page) == 3 and set(page) <= await ids("job"), page  # the page is of the matching ids


async def test_list_by_workflow_is_exact(fleet: Fleet, producer: Producer, client: Client) -> None:
    await fleet.start_worker()
    await producer.start("sequence", {"a": 1, "b": 1}, instance_id="one")
    await client.wait("one", timeout=30)

    assert [info.id for info in await client.list(workflow="sequence")] == ["one"]
    assert await client.list(workflow="%") == []
    assert await client.list(workflow="seq%") == []
    assert await client.list(workflow="SEQUENCE") == []
