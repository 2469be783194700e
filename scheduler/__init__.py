"""Stepline's scheduler: durable timers in PostgreSQL, fired as messages through the outbox."""

from stepline.scheduler.runner import run_scheduler
from stepline.scheduler.timers import fire_due_timers

__all__ = ["fire_due_timers", "run_scheduler"]
