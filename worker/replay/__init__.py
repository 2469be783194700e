"""The replay engine: run workflow code over its stored history to find what comes next."""

from stepline.worker.replay.engine import NewEntry, Outcome, Replay

__all__ = ["NewEntry", "Outcome", "Replay"]
