"""`why`: one paragraph per state an instance can be in, asserted on the words an operator reads."""

from __future__ import annotations

import re
from datetime import timedelta

import pytest

from stepline import Client, Producer
from stepline.producer.why import why_text
from stepline.shared.db.schema import instances
from stepline.shared.diagnosis import Limits
from stepline.shared.errors import InstanceNotFoundError
from stepline.shared.settings import Settings
from tests.pool_workflows import pooled
from tests.support import db
from tests.support.fleet import Fleet
from tests.support.polling import eventually, until_status
from tests.support.stranding import age, delete_timers, lost_step, set_step_detail

pytestmark = pytest.mark.both_backends

LIMITS = Limits(grace=timedelta(minutes=1), default_step_timeout=timedelta(seconds=30))
TIME = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC"


async def _why(client: Client, instance_id: str) -> str:
    return why_text(await client.why(instance_id, limits=LIMITS))


async def _why_once_started(client: Client, instance_id: str) -> str:
    """``_why``, or "" while no worker has taken the start yet (to poll right after a start)."""
    try:
        return await _why(client, instance_id)
    except InstanceNotFoundError:
        return ""


async def test_finished_instances_say_when_and_the_error(
    fleet: Fleet, producer: Producer, control: Client
) -> None:
    await fleet.start_worker()
    done = await producer.start("sequence", {"a": 1, "b": 2})
    failed = await producer.start("non-retryable", None)
    sleeping = await producer.start("sleeper", {"duration": "1 hour"})
    await control.wait(done, timeout=30)
    await control.wait(failed, timeout=30)
    await until_status(control, sleeping, "waiting")
    await control.terminate(sleeping)

    assert re.fullmatch(
        rf"{done} \(sequence, complete\): complete at {TIME} after \d+ s; nothing is wrong",
        await _why(control, done),
    )
    errored = await _why(control, failed)
    assert re.match(rf"{failed} \(non-retryable, errored\): errored at {TIME} after \d+ s: ", errored)
    assert "StepFailedError" in errored and "\n" not in errored
    assert re.match(
        rf"{sleeping} \(sleeper, terminated\): terminated at {TIME} .*terminated on request",
        await _why(control, sleeping),
    )


async def test_waits_for_an_event_a_sleep_and_a_child_say_what_moves_them(
    fleet: Fleet, producer: Producer, control: Client
) -> None:
    await fleet.start_worker()
    timed = await producer.start("approval", {"timeout": "1 hour"})
    untimed = await producer.start("two-approvals", None)
    sleeping = await producer.start("sleeper", {"duration": "1 hour"})
    parent = await producer.start("parent-of-sleeper", None)
    for instance_id in (timed, untimed, sleeping):
        await until_status(control, instance_id, "waiting")

    text = await _why(control, timed)
    assert re.search(
        rf"waiting in `decision` for event `approved` since {TIME} \(\d+ s\); "
        rf"times out at {TIME} \(in 59 min",
        text,
    ), text
    assert text.endswith("nothing is wrong")
    assert "no time-out: only that event moves it; nothing is wrong" in await _why(control, untimed)
    assert re.search(
        rf"sleeping in `nap` until {TIME} \(in 59 min \d+ s\); nothing is wrong",
        await _why(control, sleeping),
    )
    diagnosis = await eventually(
        lambda: control.why(parent, limits=LIMITS),
        check=lambda found: "which is waiting" in found.headline,
        what="the child to sleep",
    )
    child = diagnosis.waits[0]
    assert (child.kind, child.is_alive) == ("child", True)
    assert re.search(
        r"`nap` waits for child \S+ \(workflow `sleeper`\), which is waiting", diagnosis.headline
    )


async def test_a_retry_says_when_the_next_attempt_is_due(
    fleet: Fleet, producer: Producer, control: Client
) -> None:
    await fleet.start_worker()
    instance_id = await producer.start("flaky", {"fail_times": 1, "limit": 3, "delay": "1 hour"})

    async def text() -> str:
        return await _why_once_started(control, instance_id)

    found = await eventually(text, check=lambda said: "attempt 2 is due" in said, what="the retry")
    assert re.search(
        rf"step `call` failed attempt 1 \(ConnectionError: transient failure on attempt 1\); "
        rf"attempt 2 is due at {TIME} \(in 59 min",
        found,
    ), found


async def test_a_sent_step_is_fine_then_overdue_then_stranded(
    fleet: Fleet, producer: Producer, control: Client, settings: Settings
) -> None:
    await fleet.start_worker()
    instance_id = await lost_step(producer, control, settings)

    fresh = await _why(control, instance_id)
    assert re.search(
        rf"step `next` attempt 1 was sent to the workflow's queue at {TIME} \(\d+ s ago\); timeout 30 s; "
        r"nothing is wrong",
        fresh,
    ), fresh

    await age(settings.database, instance_id, timedelta(seconds=45))  # past its timeout, within the grace
    assert "; overdue: no worker committed it within its timeout" in await _why(control, instance_id)

    await age(settings.database, instance_id, timedelta(minutes=5))
    diagnosis = await control.why(instance_id, limits=LIMITS)
    assert diagnosis.is_stranded
    assert diagnosis.headline.startswith("stranded: nothing will move it (step `next` attempt 1 was sent")
    assert diagnosis.headline.endswith(f"its message is lost); `stepline repair {instance_id}`")

    # A step that declared a long timeout is still within it.
    await set_step_detail(settings.database, instance_id, "next", {"timeout_s": 7200})
    assert "timeout 2 h; nothing is wrong" in await _why(control, instance_id)


async def test_a_sleep_whose_timer_is_gone_is_stranded(
    fleet: Fleet, producer: Producer, control: Client, settings: Settings
) -> None:
    await fleet.start_worker()
    instance_id = await producer.start("sleeper", {"duration": "1 hour"})
    await until_status(control, instance_id, "waiting")
    await delete_timers(settings.database, instance_id)
    await age(settings.database, instance_id, timedelta(minutes=5))
    text = await _why(control, instance_id)
    assert re.search(
        rf"stranded: nothing will move it \(sleep `nap` should have ended at {TIME} but its timer and "
        rf"wake-up are gone\); `stepline repair {instance_id}`",
        text,
    ), text


async def test_queued_paused_and_held(
    fleet: Fleet, producer: Producer, control: Client, settings: Settings
) -> None:
    await fleet.start_worker()
    first = await producer.start("gate", {"lane": "acme"})
    await until_status(control, first, "waiting")
    second = await producer.start("gate", {"lane": "acme"})
    await until_status(control, second, "queued")
    assert re.search(
        rf"queued since {TIME} \(\d+ s\): 1 of 1 slots of key `acme` taken by {first}; "
        "it starts when one of them finishes",
        await _why(control, second),
    )

    waiting = await producer.start("two-approvals", None)
    await until_status(control, waiting, "waiting")
    await control.pause(waiting)
    assert re.search(
        rf"paused by an operator since {TIME} \(\d+ s\); `stepline resume {waiting}` lets it go on",
        await _why(control, waiting),
    )

    # Held: what a worker writes when a replay diverges (stepline.worker.plan.Planner.hold).
    error = {"type": "NonDeterminismError", "message": "instance x: expected step 'a', found step 'b'\nmore"}
    await db.execute(
        settings.database, instances.update().where(instances.c.id == waiting).values(error=error)
    )
    held = await _why(control, waiting)
    assert re.search(
        rf"held since {TIME} \(\d+ s\): NonDeterminismError: instance x: expected step 'a', found step 'b'; "
        rf"deploy code that replays its history, then `stepline resume {waiting}`",
        held,
    ), held


async def test_an_unknown_instance_is_refused(control: Client) -> None:
    with pytest.raises(InstanceNotFoundError):
        await control.why("no-such-instance")


async def test_a_step_waiting_for_a_pool_nobody_consumes_is_called_out(
    fleet: Fleet, producer: Producer, control: Client
) -> None:
    await fleet.start_worker(workflows={pooled.name: pooled})
    instance_id = await producer.start("pooled", {"text": "abc"})

    async def text() -> str:
        return await _why_once_started(control, instance_id)

    sent = re.compile(rf"step `infer` attempt 1 was sent to pool `gpu` at {TIME}")
    # Wait for the instance to reach the gpu step: `prepare` may still be on its way first.
    said = await eventually(text, check=lambda found: sent.search(found) is not None, what="the gpu step")
    assert said.endswith(
        "; wrong: step `infer` waits for a worker of pool `gpu`, and none consumes it; "
        "it runs once a `stepline-worker --pool gpu` runs"
    ), said
