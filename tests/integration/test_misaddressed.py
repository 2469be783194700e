"""A message that names an instance of another workflow is dead-lettered and harms nothing.

The worker serves both workflows, and their params look alike, so the message is
well-formed, routable and passes the params check: only the instance row knows it
belongs to ``approval-or-timeout``, not to ``approval``. Replaying it with
``approval``'s code would end it for good as non-deterministic.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from stepline import Client, Producer
from stepline.shared.settings import Settings
from tests.support import db
from tests.support.amqp import publish_raw, take_dead_letters
from tests.support.fleet import Fleet
from tests.support.polling import until_status

pytestmark = pytest.mark.both_backends

# Each kind of message, addressed to workflow "approval" but naming an "approval-or-timeout"
# instance (waiting for its "decision" event).
MISADDRESSED: dict[str, dict[str, Any]] = {
    "start": {"params": {}},
    "step": {"step": "submit", "occurrence": 1, "attempt": 1},
    "wake": {"step": "decision", "occurrence": 1, "attempt": 1},
    "event": {"event_id": "wrong-door", "event_type": "approved", "payload": "yes"},
    "advance": {"reason": "resume"},
}


async def _instance_rows(settings: Settings, instance_id: str) -> tuple[Any, ...]:
    instance = await db.rows(
        settings.database, "SELECT workflow, status, version, error FROM instances WHERE id = %s", instance_id
    )
    steps = await db.rows(
        settings.database,
        "SELECT name, status, attempt FROM steps WHERE instance_id = %s ORDER BY position",
        instance_id,
    )
    events = await db.rows(
        settings.database, "SELECT event_id FROM events WHERE instance_id = %s", instance_id
    )
    return instance, steps, events


@pytest.mark.parametrize("kind", sorted(MISADDRESSED))
async def test_a_message_for_another_workflow_is_dead_lettered_and_leaves_the_instance_alone(
    kind: str, fleet: Fleet, producer: Producer, control: Client, settings: Settings
) -> None:
    await fleet.start_worker()
    instance_id = await producer.start("approval-or-timeout", {})
    await until_status(control, instance_id, "waiting")
    before = await _instance_rows(settings, instance_id)

    body = {"v": 1, "kind": kind, "workflow": "approval", "instance_id": instance_id, **MISADDRESSED[kind]}
    await publish_raw(settings.amqp, settings.namespace, f"{kind}.approval", json.dumps(body).encode())

    (dead,) = await take_dead_letters(settings.amqp, settings.namespace, 1)
    assert dead.reason == (
        f"{kind} message for workflow 'approval' names instance '{instance_id}', "
        "which belongs to workflow 'approval-or-timeout'; the instance was not touched"
    )
    assert dead.routing_key == f"{kind}.approval"
    assert await _instance_rows(settings, instance_id) == before

    # The instance goes on as if nothing had come.
    await control.send_event(instance_id, "approved", "yes")
    info = await control.wait(instance_id, timeout=30)
    assert (info.status, info.output) == ("complete", "approved: yes")
