"""``DeadLetters``: list, show, replay and discard the messages kept in the dead-letter queue."""

from __future__ import annotations

import builtins
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel

from stepline.shared.broker import Broker, DeadLetter, create_broker
from stepline.shared.broker.base import (
    DEAD_LETTER_ID_HEADER,
    DEAD_LETTERED_AT_HEADER,
    ORIGINAL_ROUTING_KEY_HEADER,
    REASON_HEADER,
    SettleDeadLetter,
)
from stepline.shared.errors import SteplineError, UnroutableError
from stepline.shared.settings import Settings

# Headers a dead-lettering added: a replay sends the message as it was first published.
_DEAD_LETTER_HEADERS = frozenset(
    {REASON_HEADER, ORIGINAL_ROUTING_KEY_HEADER, DEAD_LETTER_ID_HEADER, DEAD_LETTERED_AT_HEADER}
)
_RABBITMQ_DEATH_PREFIXES = ("x-death", "x-first-death-", "x-last-death-", "x-delivery-count")


class DeadLetterNotFoundError(SteplineError):
    """No kept dead letter has the id given (replayed or discarded already, or mistyped)."""

    def __init__(self, dead_id: str) -> None:
        super().__init__(
            f"no dead letter has id {dead_id!r} (replayed or discarded already?); "
            "`stepline dead list` shows the ids"
        )
        self.dead_id = dead_id


class DeadLetterInfo(BaseModel):
    """A kept dead letter as the client shows it.

    ``id`` is its stable handle (see ``stepline.shared.broker.DeadLetter.handle``):
    it names the same letter until it is replayed or discarded, whatever
    happens to the others.
    """

    id: str
    reason: str
    routing_key: str
    dead_lettered_at: datetime | None
    size: int
    headers: dict[str, str]
    body: str
    """The body as text (bytes that are not UTF-8 as ``\\x..`` escapes)."""
    body_json: Any = None
    """The body parsed, when it is JSON (else None)."""
    is_json: bool = False


class DeadLetterOutcome(BaseModel):
    """What a replay or a discard did.

    Attributes:
        action: ``replay`` or ``discard``.
        matched: letters selected.
        done: ids replayed (published and confirmed, then removed) or discarded.
        failed: id -> why it was kept (a replay the broker could not route, say).
    """

    action: Literal["replay", "discard"]
    matched: int
    done: list[str]
    failed: dict[str, str]


class DeadLetters:
    """The dead-letter queue of a namespace, over any ``Broker`` (RabbitMQ or the embedded one).

    Order is the queue's: oldest first. Letters are read without being taken
    out; a replay publishes to the letter's original routing key (mandatory,
    confirmed) and removes the letter only after the confirm, so a crash in
    between keeps it: at worst it is replayed twice, which the engine makes
    harmless (a start of an existing id, a stale step or event, is dropped).
    """

    def __init__(self, broker: Broker) -> None:
        self._broker = broker

    @classmethod
    @asynccontextmanager
    async def open(cls, settings: Settings) -> AsyncIterator[DeadLetters]:
        """The dead letters of ``settings``' broker and namespace, connected for the block."""
        broker = create_broker(settings.amqp, settings.namespace, settings.broker)
        await broker.connect()
        try:
            yield cls(broker)
        finally:
            await broker.close()

    async def list(
        self, *, reason: str | None = None, limit: int | None = None
    ) -> builtins.list[DeadLetterInfo]:
        """Kept dead letters, oldest first; with ``reason``, those whose reason holds it (any case)."""
        letters = await self._broker.dead_letters(limit=None if reason else limit)
        chosen = [_info(letter) for letter in letters if _matches(letter, reason)]
        return chosen if limit is None else chosen[:limit]

    async def count(self) -> int:
        """How many dead letters are kept."""
        return await self._broker.count_dead_letters()

    async def get(self, dead_id: str) -> DeadLetterInfo:
        """One dead letter. Raises ``DeadLetterNotFoundError``."""
        for letter in await self._broker.dead_letters():
            if letter.handle == dead_id:
                return _info(letter)
        raise DeadLetterNotFoundError(dead_id)

    async def replay(self, dead_id: str | None = None, *, reason: str | None = None) -> DeadLetterOutcome:
        """Republish one letter (``dead_id``), or every letter (whose reason holds ``reason``).

        Each goes to its original routing key, with the headers it had before it
        was dead-lettered; it is removed once the broker confirmed the publish.
        A letter the broker cannot route (its workflow's queue is gone) is kept
        and named in ``failed``.

        Raises:
            DeadLetterNotFoundError: ``dead_id`` names no kept letter.
        """
        outcome = DeadLetterOutcome(action="replay", matched=0, done=[], failed={})

        async def settle(letter: DeadLetter) -> bool:
            if not letter.routing_key:
                outcome.failed[letter.handle] = "its original routing key is unknown"
                return False
            try:
                await self._broker.publish(letter.routing_key, letter.body, _replay_headers(letter.headers))
            except UnroutableError as exc:
                outcome.failed[letter.handle] = str(exc)
                return False
            outcome.done.append(letter.handle)
            return True

        return await self._settle(outcome, settle, dead_id, reason)

    async def discard(self, dead_id: str | None = None, *, reason: str | None = None) -> DeadLetterOutcome:
        """Remove one letter (``dead_id``) for good, or every letter (whose reason holds ``reason``).

        Raises:
            DeadLetterNotFoundError: ``dead_id`` names no kept letter.
        """
        outcome = DeadLetterOutcome(action="discard", matched=0, done=[], failed={})

        async def settle(letter: DeadLetter) -> bool:
            outcome.done.append(letter.handle)
            return True

        return await self._settle(outcome, settle, dead_id, reason)

    async def _settle(
        self,
        outcome: DeadLetterOutcome,
        settle: SettleDeadLetter,
        dead_id: str | None,
        reason: str | None,
    ) -> DeadLetterOutcome:
        if dead_id is not None:
            outcome.matched = await self._broker.settle_dead_letters(
                lambda letter: letter.handle == dead_id and _matches(letter, reason), settle, limit=1
            )
            if outcome.matched == 0:
                raise DeadLetterNotFoundError(dead_id)
            return outcome
        outcome.matched = await self._broker.settle_dead_letters(
            lambda letter: _matches(letter, reason), settle
        )
        return outcome


def _matches(letter: DeadLetter, reason: str | None) -> bool:
    return reason is None or reason.casefold() in letter.reason.casefold()


def _replay_headers(headers: dict[str, str]) -> dict[str, str]:
    """The headers as first published: without those a dead-lettering added (ours and RabbitMQ's)."""
    return {
        key: value
        for key, value in headers.items()
        if key not in _DEAD_LETTER_HEADERS and not key.startswith(_RABBITMQ_DEATH_PREFIXES)
    }


def _info(letter: DeadLetter) -> DeadLetterInfo:
    try:
        parsed, is_json = json.loads(letter.body), True
    except ValueError:
        parsed, is_json = None, False
    return DeadLetterInfo(
        id=letter.handle,
        reason=letter.reason,
        routing_key=letter.routing_key,
        dead_lettered_at=letter.dead_lettered_at,
        size=len(letter.body),
        headers=letter.headers,
        body=letter.body.decode(errors="backslashreplace"),
        body_json=parsed,
        is_json=is_json,
    )


__all__ = ["DeadLetterInfo", "DeadLetterNotFoundError", "DeadLetterOutcome", "DeadLetters"]
