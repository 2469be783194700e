"""``stepline-scheduler`` that also keeps the moment each timer fired: the timers section's clock.

A fired timer leaves the ``timers`` table in the statement that queues its
message, so when it fired is known only to the scheduler that fired it: it is
what the scheduler reports through ``Hooks.timer_fired`` (the
``stepline.timer.lateness`` histogram). This runs the scheduler's own loop,
with the hooks the command would use, plus a note of each fire; on a clean stop
it writes them to the file named on its command line, one JSON array
``[kind, due_epoch_s, fired_epoch_s, committed_epoch_s]`` per line. *Fired* is
the database's moment for the row (what the histogram records); *committed* is
this process's clock when the hook ran, just after the fire's transaction
committed: from then on the wake-up is durable.

Run as ``python -m benchmarks.timer_probe OUT``, with the settings of
``stepline-scheduler`` in the environment.
"""

from __future__ import annotations

import json
import sys
import time
from datetime import datetime
from pathlib import Path

from stepline.scheduler.runner import run_scheduler
from stepline.shared.logs import configure_logging
from stepline.shared.process import run_until_signalled
from stepline.shared.settings import load_settings
from stepline.shared.telemetry import Telemetry, configure_telemetry, shutdown_telemetry


class FireNotes(Telemetry):
    """The scheduler's telemetry hooks, plus (kind, due, fired, committed) for every timer fired."""

    def __init__(self) -> None:
        super().__init__()
        self.fired: list[tuple[str, float, float, float]] = []

    def timer_fired(self, kind: str, due_at: datetime, fired_at: datetime) -> None:
        super().timer_fired(kind, due_at, fired_at)
        self.fired.append((kind, due_at.timestamp(), fired_at.timestamp(), time.time()))


def main(out: Path) -> None:
    configure_logging("scheduler")
    settings = load_settings()
    configure_telemetry("scheduler")
    notes = FireNotes()
    try:
        run_until_signalled(
            "stepline-scheduler", lambda stopping: run_scheduler(settings, stopping, hooks=notes)
        )
    finally:
        shutdown_telemetry()
        out.write_text("".join(json.dumps(one) + "\n" for one in notes.fired))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
