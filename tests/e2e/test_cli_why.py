"""`stepline why` and `stepline repair`, as an operator types them."""

from __future__ import annotations

from datetime import timedelta

import pytest

from stepline import Client, Producer
from stepline.shared.settings import Settings
from tests.support import cli
from tests.support.fleet import Fleet, process_env
from tests.support.polling import until_status
from tests.support.stranding import age, delete_timers

pytestmark = pytest.mark.e2e


@pytest.fixture
def env(settings: Settings) -> dict[str, str]:
    return {**process_env(settings), "STEPLINE_SCHEDULER__RECONCILE_GRACE": "1 min"}


async def test_why_and_repair_from_the_command_line(
    env: dict[str, str], fleet: Fleet, producer: Producer, control: Client, settings: Settings
) -> None:
    await fleet.start_worker()
    fleet.start_scheduler()
    instance_id = await producer.start("sleeper", {"duration": "1 hour"}, instance_id="nap-7")
    await until_status(control, instance_id, "waiting")

    said = await cli.run(env, "stepline", "why", instance_id)
    assert said.returncode == 0, said
    assert said.stdout.startswith("nap-7 (sleeper, waiting): sleeping in `nap` until ")
    assert said.stdout.rstrip().endswith("; nothing is wrong")
    nothing = await cli.run(env, "stepline", "repair", instance_id)
    assert nothing.stdout.startswith("nap-7: nothing to repair: sleeping in `nap` until "), nothing

    await delete_timers(settings.database, instance_id)
    await age(settings.database, instance_id, timedelta(minutes=10))
    stranded = (await cli.run(env, "stepline", "why", instance_id, "--json")).json()
    assert (stranded["state"], stranded["stranded"], stranded["status"]) == ("stranded", True, "waiting")
    assert stranded["waits"][0]["kind"] == "sleep" and stranded["waits"][0]["alive"] is False
    assert stranded["text"].endswith("`stepline repair nap-7`")
    assert stranded["paragraph"].startswith(
        "nap-7 (sleeper, waiting): stranded: nothing will move it (sleep `nap`"
    )

    repaired = await cli.run(env, "stepline", "repair", instance_id)
    assert repaired.stdout.strip() == "nap-7: repaired: armed the sleep timer of `nap` again", repaired
    assert (await control.wait(instance_id, timeout=30)).status == "complete"
    finished = (await cli.run(env, "stepline", "repair", instance_id, "--json")).json()
    assert (finished["repaired"], finished["done"], finished["diagnosis"]["state"]) == (False, [], "finished")

    unknown = await cli.run(env, "stepline", "why", "no-such-instance")
    assert unknown.returncode == 1 and "no-such-instance" in unknown.stderr
