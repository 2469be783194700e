"""Fixtures of the unit tests."""

from __future__ import annotations

import os

import pytest


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No STEPLINE_* variable, whatever the shell (or the Makefile) exported."""
    for name in list(os.environ):
        if name.upper().startswith("STEPLINE_"):
            monkeypatch.delenv(name)
