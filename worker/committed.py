"""What handling a step message left to do: outbox rows to publish, and maybe a step to run here next."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from stepline.shared.db.records import OutboxRow
from stepline.shared.messages import StepMessage
from stepline.worker.workflow import Workflow


@dataclass(frozen=True, slots=True)
class LocalStep:
    """A step planned by a commit of this worker, which it may run itself with the replay it kept.

    Its message is committed in the outbox like any other (``row``); a worker
    that runs it locally leaves that row unsent and deletes it once the step's
    own attempt has committed, so a crash in between leaves the row for the sweeper.
    """

    workflow: Workflow[Any, Any]
    message: StepMessage
    row: OutboxRow


@dataclass(frozen=True, slots=True)
class Committed:
    """What a handled message left to do: outbox rows to publish, and maybe a step to run here next."""

    rows: list[OutboxRow]
    local: LocalStep | None = None
