"""Payloads stored apart (the ``payloads`` table), mixed into ``Transaction``: write one, read them back.

A step result too large to keep in its row is written here first (see
``Payloads.prepare``); a history read swaps each reference for the stored value
in one more statement, only when the history holds a reference at all, and so
does ``show_payloads``, the one way every reader (the client, the CLI, the
dashboard, the testing kit) turns stored payloads into what a person sees.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from stepline.shared.codec import JSON, OFFLOAD_FIELD, Offloaded, Payloads, is_offloaded, unpack
from stepline.shared.db.schema import payloads
from stepline.shared.history import History


class PayloadStatements:
    _conn: AsyncConnection

    async def insert_payload(self, instance_id: str, payload: Offloaded) -> None:
        """Store a payload apart, as the instance's (a prune of the instance deletes it)."""
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
        """``history`` with each step result stored apart read back in place of its reference.

        A reference whose row is gone stays: reading it raises ``PayloadUnreadableError``
        naming the instance and the step (``Payloads.open``). Without references
        (the usual case) this is one type check per step and no statement.
        """
        ids = [
            record.result[OFFLOAD_FIELD] for record in history.steps.values() if is_offloaded(record.result)
        ]
        if not ids:
            return history
        found = await self.load_payloads(ids)
        steps = {
            key: replace(record, result=found.get(record.result[OFFLOAD_FIELD], record.result))
            if is_offloaded(record.result)
            else record
            for key, record in history.steps.items()
        }
        return replace(history, steps=steps)
