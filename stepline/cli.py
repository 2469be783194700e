"""``stepline``: the command group, which imports a command's module only to run that command.

The producer's commands (``start``, ``status``, ``dead``, ``why``...) and the worker's
``replay-check`` live in their packages; the producer may not import the worker, the top
package may import both, so the group is assembled here and the ``stepline`` script points
at it. Operators type these commands all day, so ``stepline --help`` lists ``COMMANDS``
without importing any of them, and ``stepline status ID`` imports the client and the
database, not aio-pika, OpenTelemetry's exporters or the worker
(``tests/unit/test_cli_imports.py`` holds that line; ``docs/development.md`` says how to add
a command).
"""

from __future__ import annotations

import atexit
import importlib
import os
import sys
import threading
from typing import Any, NamedTuple

import click


class Lazy(NamedTuple):
    """Where a command lives (``"module:attribute"``) and the line ``stepline --help`` shows for it.

    ``help`` is the command's own first sentence, as click would cut it from the docstring;
    a unit test loads every command and compares, so the two cannot drift apart.
    """

    target: str
    help: str


# One line per command: its name, where it lives, its first sentence.
COMMANDS: dict[str, Lazy] = {
    "db": Lazy("stepline.producer.cli:db", "Database schema commands."),
    "dead": Lazy("stepline.producer.dead_cli:dead", "The dead-letter queue: messages no worker could process, each kept with its reason."),
    "debug": Lazy("stepline.worker.debug_cli:debug", "Replay instance ID's recorded history against MODULE's code, here: no step runs, nothing is written."),
    "dev": Lazy("stepline.producer.cli:dev", "Run Stepline on local files, with no PostgreSQL and no RabbitMQ."),
    "fleet": Lazy("stepline.producer.cli:fleet", "Run workers and schedulers as local processes; restart any that crash; stop all on SIGTERM."),
    "history": Lazy("stepline.producer.cli:history", "Show an instance's step timeline: every attempt, its worker, timing and outcome."),
    "list": Lazy("stepline.producer.cli:list_", "List instances, newest first, a page at a time."),
    "pause": Lazy("stepline.producer.control_cli:pause", "Pause an instance: no new step starts; a running step still commits."),
    "prune": Lazy("stepline.producer.cli:prune", "Delete instances finished longer ago than --older-than, with all their rows, in batches."),
    "repair": Lazy("stepline.producer.why_cli:repair", "Re-plan INSTANCE_ID if nothing will move it, as the scheduler's reconciler does; else change nothing."),
    "replay-check": Lazy("stepline.worker.replay_check:replay_check", "Replay every unfinished instance against MODULE's code before a deploy; write nothing."),
    "restart": Lazy("stepline.producer.control_cli:restart", "Clear an instance's history and run it again from the start, same id."),
    "resume": Lazy("stepline.producer.control_cli:resume", "Resume a paused instance."),
    "schedule": Lazy("stepline.producer.schedule_cli:schedule", "Start workflows on a clock: create, list, pause, resume, delete and trigger schedules."),
    "schema": Lazy("stepline.worker.schema_cli:schema", "Print JSON Schema (draft 2020-12) of the start and event envelopes, and of workflows."),
    "send-event": Lazy("stepline.producer.cli:send_event", "Send an event of EVENT_TYPE to an instance; its earliest matching wait takes it."),
    "start": Lazy("stepline.producer.cli:start", "Publish a start event for WORKFLOW; prints the instance id."),
    "status": Lazy("stepline.producer.cli:status", "Show an instance: status, output or error, its steps and its trace id."),
    "terminate": Lazy("stepline.producer.control_cli:terminate", "Terminate an instance and its children; nothing runs again."),
    "ui": Lazy("stepline.producer.ui_cli:ui", "Serve the web dashboard: overview, instances, dead letters, schedules."),
    "why": Lazy("stepline.producer.why_cli:why", "Say what INSTANCE_ID waits on, since when, what will move it, and whether anything is wrong."),
}  # fmt: skip


def load_command(entry: Lazy) -> click.Command:
    """Import the module an entry names and return its command."""
    module_name, _, attribute = entry.target.partition(":")
    command = getattr(importlib.import_module(module_name), attribute)
    if not isinstance(command, click.Command):
        raise TypeError(f"{entry.target} is a {type(command).__name__}, not a click command")
    return command


class LazyGroup(click.Group):
    """A group whose commands are ``COMMANDS`` entries, each imported when it is called."""

    def __init__(self, *args: Any, lazy: dict[str, Lazy], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lazy = lazy

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        entry = self.lazy.get(cmd_name)
        if entry is None:
            return super().get_command(ctx, cmd_name)
        return load_command(entry)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """The command list of ``--help``, from the table: no command's module is imported for it."""
        names = self.list_commands(ctx)
        if not names:
            return
        limit = formatter.width - 6 - max(len(name) for name in names)
        rows = []
        for name in names:
            entry = self.lazy.get(name)
            command = click.Command(name, help=entry.help) if entry else self.commands.get(name)
            if command is not None and not command.hidden:
                rows.append((name, command.get_short_help_str(limit)))
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, lazy=COMMANDS, context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Stepline: durable workflows on PostgreSQL and RabbitMQ.

    Reads STEPLINE_DATABASE_URL and STEPLINE_AMQP_URL; or STEPLINE_EMBEDDED,
    the directory of `stepline dev`'s local state, instead of both.
    """
    from stepline.shared.logs import configure_logging

    configure_logging("stepline", level="WARNING")


def run() -> None:
    """The ``stepline`` script: run the group, then end the process without tearing it down.

    Once a command has returned, the interpreter would spend 0.15 to 0.2 s of CPU freeing the
    modules it imported (SQLAlchemy, psycopg, pydantic: a third of ``stepline status``, issue
    21). Nothing of that is seen, so when the command is done and no other thread runs, the
    atexit handlers run (a telemetry exporter's last flush, logging's), stdout and stderr are
    flushed, and the process ends with the status the interpreter would have given. Where
    that cannot be done cleanly (a thread still runs, a non-numeric status, a closed pipe),
    the interpreter exits as usual.
    """
    try:
        main.main(prog_name="stepline")
    except SystemExit as exc:
        if (exc.code is None or isinstance(exc.code, int)) and threading.active_count() == 1:
            _exit_now(exc.code or 0)
        raise


def _exit_now(code: int) -> None:
    """End the process with ``code`` after the atexit handlers and a flush; return if the flush fails."""
    atexit._run_exitfuncs()  # each runs once: this clears them, as the interpreter's own exit would
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):
        return  # a reader that went away, a closed stream: the interpreter reports it as usual
    os._exit(code)


__all__ = ["COMMANDS", "Lazy", "LazyGroup", "main", "run"]

if __name__ == "__main__":
    run()
