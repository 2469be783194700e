"""Fault points for the chaos suite; inert unless ``STEPLINE_FAULTS`` names them.

``STEPLINE_FAULTS="crash_after_commit=0.02,duplicate_publish=0.05"`` makes a
worker kill itself right after a commit and before the ack in 2% of
messages, and the outbox publish each message twice 5% of the time. These
are the windows that a random SIGKILL rarely hits; the chaos suite needs to
hit them on purpose. Unset (the default), every check is one dict lookup.
"""

from __future__ import annotations

import logging
import os
import random

log = logging.getLogger("stepline.faults")

CRASH_AFTER_COMMIT = "crash_after_commit"
DUPLICATE_PUBLISH = "duplicate_publish"
CRASH_AFTER_LEASE = "crash_after_lease"
"""A long step's lease is written, its delivery not yet settled (``StepRunner``)."""


def _parse(text: str) -> dict[str, float]:
    chances: dict[str, float] = {}
    for item in text.split(","):
        name, _, chance = item.strip().partition("=")
        if name:
            chances[name] = float(chance or 1.0)
    return chances


_CHANCES = _parse(os.environ.get("STEPLINE_FAULTS", ""))


def strikes(point: str) -> bool:
    """Whether the fault ``point`` fires this time."""
    chance = _CHANCES.get(point)
    return chance is not None and random.random() < chance


def crash_here(point: str) -> None:
    """Die at once, as SIGKILL would, if the fault ``point`` fires."""
    if strikes(point):
        log.warning("fault injected: %s", point, extra={"event": "fault_injected"})
        logging.shutdown()
        os._exit(137)
