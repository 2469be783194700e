"""Payloads stored apart (the ``payloads`` table), mixed into ``Transaction``: write, read back, prune.

A step result, params or an event payload too large to keep in its row or
message is written here first (see ``Payloads.prepare`` and ``Payloads.offload``);
a history read swaps each reference (the params', the step results') for the
stored value in one more statement, only when the history holds a reference at
all; ``read_payload`` does it for one value (a start's params, an event as it
arrives); and ``show_payloads`` is the one way every reader (the client, the
CLI, the dashboard, the testing kit) turns stored payloads into what a person sees.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from datetime import timedelta

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from stepline.shared.codec import JSON, OFFLOAD_FIELD, Offloaded, Payloads, is_offloaded, unpack
from stepline.shared.db.schema import instances, payloads, utc_now
from stepline.shared.history import History


class PayloadStatements:
    _conn: AsyncConnection

    async def insert_payload(self, instance_id: str, payload: Offloaded) -> None:
        """Store a payload apart, as the instance's (a prune of the instance deletes it).

        The instance need not exist yet: a client writes a start's params, and a
        parent its child's, before the start is consumed.
        """
        await self._conn.execute(
            payloads.insert().values(
                id=payload.id, instance_id=instance_id, size=payload.size, data=payload.data
            )
        )

    async def load_payloads(self, ids: Sequence[str]) -> dict[str, JSON]:
        """The stored values of these payloads (still sealed if they were), by id; missing ids left out."""
        if not ids:
            return {}
        rows = await self._conn.execute(
            sa.select(payloads.c.id, payloads.c.data).where(payloads.c.id.in_(sorted(set(ids))))
        )
        return {row.id: unpack(bytes(row.data)) for row in rows}

    async def read_payload(self, value: JSON) -> JSON:
        """``value`` with its stored value in place of a reference (still sealed if it was).

        A reference whose row is gone is returned as it is: opening it raises
        ``PayloadUnreadableError`` (``Payloads.open``) naming who read it.
        """
        if not is_offloaded(value):
            return value
        found = await self.load_payloads([value[OFFLOAD_FIELD]])
        return found.get(value[OFFLOAD_FIELD], value)

    async def delete_payloads_of(self, instance_ids: Sequence[str]) -> None:
        """Delete the payloads of these instances (they are being deleted)."""
        if instance_ids:
            await self._conn.execute(payloads.delete().where(payloads.c.instance_id.in_(instance_ids)))

    async def delete_orphan_payloads(self, *, older_than: timedelta) -> int:
        """Delete payloads written more than ``older_than`` ago whose instance does not exist; how many.

        Their start never made an instance: it was dead-lettered (bad params, an
        unknown workflow), or its instance was pruned before a child it started
        consumed its own start.
        """
        orphaned = ~sa.exists().where(instances.c.id == payloads.c.instance_id)
        result = await self._conn.execute(
            payloads.delete().where(payloads.c.created_at < utc_now(-older_than), orphaned)
        )
        return int(result.rowcount or 0)

    async def show_payloads(self, payloads: Payloads, values: Sequence[JSON]) -> list[JSON]:
        """Stored payloads as a person reads them, in order: the one reader of every payload column.

        Each reference is swapped for its stored value (one statement for all of
        them, none without any), then each value is opened with ``payloads``
        (``Payloads.show``): decrypted where this process has the key, else
        ``ENCRYPTED``; ``GONE`` for a reference whose row is gone.
        """
        ids = [value[OFFLOAD_FIELD] for value in values if is_offloaded(value)]
        found = await self.load_payloads(ids)
        return [
            payloads.show(found.get(value[OFFLOAD_FIELD], value) if is_offloaded(value) else value)
            for value in values
        ]

    async def with_payloads(self, history: History) -> History:
        """``history`` with its params and each step result stored apart read back in place of its reference.

        A reference whose row is gone stays: reading it raises ``PayloadUnreadableError``
        naming the instance and the step, or the params (``Payloads.open``). Without
        references (the usual case) this is one type check per step and no statement.
        """
        ids = [
            record.result[OFFLOAD_FIELD] for record in history.steps.values() if is_offloaded(record.result)
        ]
        if is_offloaded(history.params):
            ids.append(history.params[OFFLOAD_FIELD])
        if not ids:
            return history
        found = await self.load_payloads(ids)
        params = history.params
        if is_offloaded(params):
            params = found.get(params[OFFLOAD_FIELD], params)
        steps = {
            key: replace(record, result=found.get(record.result[OFFLOAD_FIELD], record.result))
            if is_offloaded(record.result)
            else record
            for key, record in history.steps.items()
        }
        return replace(history, params=params, steps=steps)
