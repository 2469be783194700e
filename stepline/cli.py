"""``stepline``: the producer's commands (``schedule``, ``dead``, ``why``...), the worker's ``replay-check``.

The deploy gate replays histories with the worker's engine, and the producer
may not import the worker; the top package may import both, so the command
group is assembled here and the ``stepline`` script points at it.
"""

from stepline.producer import control_cli
from stepline.producer.cli import main
from stepline.producer.dead_cli import dead
from stepline.producer.schedule_cli import schedule
from stepline.producer.ui_cli import ui
from stepline.producer.why_cli import repair, why
from stepline.worker.debug_cli import debug
from stepline.worker.replay_check import replay_check
from stepline.worker.schema_cli import schema as schema_command

main.add_command(replay_check)
main.add_command(debug)
main.add_command(schema_command)
main.add_command(schedule)
main.add_command(why)
main.add_command(repair)
main.add_command(dead)
main.add_command(ui)
for command in control_cli.commands:
    main.add_command(command)

__all__ = ["main"]
