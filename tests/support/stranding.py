"""Put instances in the states `why` and the reconciler judge: aged, stranded on purpose."""

from __future__ import annotations

from datetime import timedelta

from stepline import Client, Producer
from stepline.shared.db.schema import instances, steps, timers, utc_now
from stepline.shared.settings import Settings
from tests.support import db
from tests.support.polling import eventually


async def age(database_url: str, instance_id: str, by: timedelta) -> None:
    """Make the instance and its steps look unchanged for ``by`` (and a sleep due as long ago)."""
    past = utc_now(-by)
    await db.execute(
        database_url, instances.update().where(instances.c.id == instance_id).values(updated_at=past)
    )
    await db.execute(
        database_url,
        steps.update().where(steps.c.instance_id == instance_id).values(updated_at=past, started_at=past),
    )
    await db.execute(
        database_url,
        steps.update()
        .where(steps.c.instance_id == instance_id, steps.c.fire_at.is_not(None))
        .values(fire_at=past),
    )


async def delete_timers(database_url: str, instance_id: str) -> None:
    """Lose the instance's armed timers, as a bad restore or a hand-edited database would."""
    await db.execute(database_url, timers.delete().where(timers.c.instance_id == instance_id))


async def outbox_empty(database_url: str) -> bool:
    """Whether every outbox row was published (or run locally) and deleted."""
    return int(await db.scalar(database_url, "SELECT count(*) FROM outbox")) == 0


async def lost_step(producer: Producer, control: Client, settings: Settings) -> str:
    """A `slow-pair` instance running, whose step `next` is planned but has no message anywhere.

    The instance is paused while `slow` runs (so `next` is held back, unsent), then
    set running in the database: a resume whose advance message was lost.
    """
    instance_id = await producer.start("slow-pair", None)
    await eventually(lambda: db.side_effects(settings.database, instance_id, "slow"), what="slow to start")
    await control.pause(instance_id)

    async def next_planned() -> list[tuple[str, str]]:
        info = await control.get(instance_id)
        assert info is not None
        return [(step.name, step.status) for step in info.steps]

    await eventually(
        next_planned,
        check=lambda found: found == [("slow", "succeeded"), ("next", "running")],
        what="next planned",
    )
    await eventually(lambda: outbox_empty(settings.database), check=bool, what="the outbox to drain")
    await db.execute(
        settings.database,
        instances.update()
        .where(instances.c.id == instance_id)
        .values(status="running", updated_at=utc_now()),
    )
    return instance_id


async def set_step_detail(database_url: str, instance_id: str, name: str, detail: object) -> None:
    """Overwrite a step's ``detail`` (e.g. a declared timeout)."""
    statement = steps.update().where(steps.c.instance_id == instance_id, steps.c.name == name)
    await db.execute(database_url, statement.values(detail=detail))
