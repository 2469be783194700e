"""check_replay on a history exported by `stepline history --json`, as a CI job would use it."""

from __future__ import annotations

import pytest

from stepline import Client, Producer
from stepline.shared.errors import NonDeterminismError
from stepline.shared.settings import Settings
from stepline.worker import Context, Workflow
from stepline.worker.testing import check_replay
from tests.support import cli
from tests.support.fleet import Fleet, process_env
from tests.workflows import add, describe, sequence

pytestmark = pytest.mark.e2e


async def _sequence_v2(ctx: Context, params: object) -> object:
    total = await ctx.step("add", add, 1, 2)
    return await ctx.step("describe-differently", describe, total.value)


async def test_an_exported_history_replays_and_a_breaking_change_is_caught(
    fleet: Fleet, producer: Producer, client: Client, settings: Settings
) -> None:
    await fleet.start_worker()
    instance_id = await producer.start("sequence", {"a": 1, "b": 2})
    await client.wait(instance_id, timeout=30)
    exported = (await cli.run(process_env(settings), "stepline", "history", instance_id, "--json")).stdout

    check_replay(sequence, exported)  # the code that ran it replays it exactly
    with pytest.raises(NonDeterminismError, match="the history holds step 'multiply' at position 2"):
        check_replay(Workflow("sequence", _sequence_v2), exported)
