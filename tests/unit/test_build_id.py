"""The default build id: a hash of the workflow modules' source, the same for the same code."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from stepline.worker.registry import load_workflows, source_build_id

ORDERS = """
from stepline import Context, workflow


async def charge() -> str:
    return "charged"


@workflow("orders")
async def orders(ctx: Context, params: None) -> str:
    return await ctx.step("charge", charge)
"""

REPORTS = """
from stepline import Context, workflow


@workflow("reports")
async def reports(ctx: Context, params: None) -> str:
    return "done"
"""

MODULES = ["bid_orders", "bid_reports"]


@pytest.fixture
def modules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Two workflow modules in a folder on sys.path, forgotten by the import system afterwards."""
    (tmp_path / "bid_orders.py").write_text(ORDERS)
    (tmp_path / "bid_reports.py").write_text(REPORTS)
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in MODULES:
        monkeypatch.delitem(sys.modules, name, raising=False)
    return tmp_path


def fresh_build_id(names: list[str]) -> str:
    """The build id a worker starting now would get for these modules (as a new process imports them)."""
    for name in MODULES:
        sys.modules.pop(name, None)
    return source_build_id(load_workflows(names), names)


def test_the_same_modules_give_the_same_short_id(modules: Path) -> None:
    first = fresh_build_id(MODULES)
    again = fresh_build_id(MODULES)
    reordered = fresh_build_id(list(reversed(MODULES)))

    assert first == again == reordered
    assert len(first) == 12
    assert all(char in "0123456789abcdef" for char in first)


def test_a_change_to_a_modules_source_changes_the_id(modules: Path) -> None:
    before = fresh_build_id(MODULES)
    (modules / "bid_reports.py").write_text(REPORTS.replace('"done"', '"done twice"'))
    after = fresh_build_id(MODULES)
    (modules / "bid_reports.py").write_text(REPORTS)

    assert after != before
    assert fresh_build_id(MODULES) == before


def test_another_set_of_modules_has_another_id(modules: Path) -> None:
    assert fresh_build_id(["bid_orders"]) != fresh_build_id(MODULES)
