"""``stepline dead list|show|replay|discard``: the dead-letter queue from the command line."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import TypeVar

import click
from rich.table import Table

from stepline.producer.cli import JSON_OPTION, _console, _plain, _printable, _run, _settings, _time
from stepline.producer.dead_letters import DeadLetterInfo, DeadLetterOutcome, DeadLetters

T = TypeVar("T")

DEAD_ID = click.argument("dead_id", metavar="ID", required=False)
ALL_OPTION = click.option(
    "--all", "every", is_flag=True, help="Every kept dead letter (or each --reason picks)."
)
REASON_OPTION = click.option(
    "--reason", default=None, metavar="TEXT", help="Only letters whose reason holds TEXT (any case)."
)


def _with_dead_letters(use: Callable[[DeadLetters], Awaitable[T]]) -> T:
    settings = _settings("amqp_url")

    async def body() -> T:
        async with DeadLetters.open(settings) as letters:
            return await use(letters)

    return _run(body())


@click.group()
def dead() -> None:
    """The dead-letter queue: messages no worker could process, each kept with its reason.

    Each letter has an ID that names it until it is replayed or discarded: the
    row id in the embedded mode; on RabbitMQ a 12-hex-digit id given when it was
    dead-lettered. Letters are listed oldest first. Needs STEPLINE_AMQP_URL (or
    STEPLINE_EMBEDDED).
    """


@dead.command(name="list")
@REASON_OPTION
@click.option("--limit", type=click.IntRange(1), default=1000, show_default=True, help="At most this many.")
@JSON_OPTION
def list_(reason: str | None, limit: int, as_json: bool) -> None:
    """List dead letters, oldest first: id, age, reason, original routing key, size."""

    async def use(letters: DeadLetters) -> tuple[list[DeadLetterInfo], int]:
        return await letters.list(reason=reason, limit=limit), await letters.count()

    found, total = _with_dead_letters(use)
    if as_json:
        click.echo(json.dumps([_summary(info) for info in found], indent=2))
        return
    now = datetime.now(UTC)
    table = Table("id", "age", "reason", "routing key", "size", title="dead letters, oldest first")
    for info in found:
        reason_text = _printable(info.reason)
        table.add_row(
            _plain(info.id),
            _age(info.dead_lettered_at, now),
            _plain(reason_text if len(reason_text) <= 80 else reason_text[:77] + "..."),
            _plain(info.routing_key or "?"),
            f"{info.size} B",
        )
    console = _console()
    if found:
        console.print(table)
    which = f" whose reason holds {reason!r}" if reason else ""
    console.print(_plain(f"{len(found)} dead letters{which} shown; {total} kept"))


@dead.command()
@click.argument("dead_id", metavar="ID")
@JSON_OPTION
def show(dead_id: str, as_json: bool) -> None:
    """Show one dead letter: reason, routing key, headers (one per line) and body (pretty if JSON)."""
    info = _with_dead_letters(lambda letters: letters.get(dead_id))
    if as_json:
        click.echo(json.dumps(info.model_dump(mode="json"), indent=2))
        return
    now = datetime.now(UTC)
    lines = [
        f"dead letter {info.id}",
        f"reason: {info.reason}",
        f"routing key: {info.routing_key or '?'}",
        f"dead-lettered: {_time(info.dead_lettered_at)} ({_age(info.dead_lettered_at, now)} ago)",
        f"size: {info.size} bytes",
        "headers:",
        *(f"  {key}: {value}" for key, value in sorted(info.headers.items())),
    ]
    for line in lines:
        click.echo(_printable(line))
    click.echo("body:" if info.is_json else "body (not JSON):")
    if info.is_json:
        # ensure_ascii: every character that could move the cursor or read as markup is escaped.
        click.echo(json.dumps(info.body_json, indent=2, ensure_ascii=True))
    else:
        click.echo(_printable(info.body))


def _settle_command(name: str, summary: str) -> None:
    """Register ``stepline dead NAME ID|--all [--reason TEXT]``."""

    @dead.command(name=name, help=summary)
    @DEAD_ID
    @ALL_OPTION
    @REASON_OPTION
    @JSON_OPTION
    def command(dead_id: str | None, every: bool, reason: str | None, as_json: bool) -> None:
        if (dead_id is None) == (not every):
            raise click.UsageError("give one dead letter ID, or --all (with --reason TEXT to pick by reason)")
        if dead_id is not None and reason is not None:
            raise click.UsageError("--reason picks letters for --all; with an ID, leave it out")
        outcome = _with_dead_letters(lambda letters: getattr(letters, name)(dead_id, reason=reason))
        _print_outcome(outcome, as_json)


_settle_command(
    "replay",
    "Republish dead letters to their original routing key (confirmed), then remove them.\n\n"
    "A letter is removed only after the broker confirmed its publish: nothing is lost,\n"
    "and a replay repeated after a crash is harmless. One that cannot be routed is kept.",
)
_settle_command("discard", "Remove dead letters for good.")


def _print_outcome(outcome: DeadLetterOutcome, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(outcome.model_dump(mode="json"), indent=2))
        return
    past = {"replay": "replayed", "discard": "discarded"}[outcome.action]
    for dead_id in outcome.done:
        click.echo(_printable(f"{dead_id}: {past}"))
    for dead_id, why in outcome.failed.items():
        click.echo(_printable(f"{dead_id}: kept: {why}"))
    click.echo(f"{past} {len(outcome.done)} of {outcome.matched} dead letters; {len(outcome.failed)} kept")


def _summary(info: DeadLetterInfo) -> dict[str, object]:
    return {
        "id": info.id,
        "reason": info.reason,
        "routing_key": info.routing_key,
        "dead_lettered_at": info.dead_lettered_at.isoformat() if info.dead_lettered_at else None,
        "size": info.size,
    }


def _age(moment: datetime | None, now: datetime) -> str:
    """How long ago: ``42 s``, ``7 min``, ``2 h 11 min``, ``3 d 4 h``."""
    if moment is None:
        return "?"
    seconds = max(int((now - moment).total_seconds()), 0)
    if seconds < 60:
        return f"{seconds} s"
    minutes, hours, days = seconds // 60, seconds // 3600, seconds // 86400
    if minutes < 60:
        return f"{minutes} min"
    if hours < 24:
        return f"{hours} h {minutes % 60} min"
    return f"{days} d {hours % 24} h"
