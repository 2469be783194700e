"""``python -m examples.live_patch``: the worked example of docs/versioning.md, run as a user would."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.fleet import ROOT

pytestmark = pytest.mark.e2e

RUN_TIMEOUT_S = 180.0
"""Longer than the script's own deadline, so that it reports first."""


def test_the_script_deploys_v2_over_sleeping_orders_and_shows_both_paths(tmp_path: Path) -> None:
    # The embedded mode, in a state directory of its own: no service, nothing shared.
    env = {name: value for name, value in os.environ.items() if not name.startswith("STEPLINE_")}
    env |= {"STEPLINE_EMBEDDED": str(tmp_path / "state"), "COLUMNS": "240"}
    process = subprocess.Popen(
        [sys.executable, "-m", "examples.live_patch"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        out, _ = process.communicate(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        # SIGTERM, not SIGKILL: the script then stops the workers it started.
        process.send_signal(signal.SIGTERM)
        out, _ = process.communicate(timeout=60)
        pytest.fail(f"the script did not finish within {RUN_TIMEOUT_S:g} s:\n{out.decode(errors='replace')}")
    text = out.decode(errors="replace")

    assert process.returncode == 0, text
    assert "all 3 orders asleep in their cool-off" in text
    assert "6/6 complete" in text
    rows = re.findall(r"(\S+-so-\d+) .*?(v[12]) .*?complete .*?(reserve-stock.*?notify)", text)
    assert (
        sorted((version, history) for _, version, history in rows)
        == [
            ("v1", "reserve-stock, charge-payment, cool-off, ship, notify"),
        ]
        * 3
        + [
            ("v2", "reserve-stock, charge-payment, $patch:fraud-check, fraud-check, cool-off, ship, notify"),
        ]
        * 3
    )
