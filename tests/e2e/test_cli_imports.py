"""``stepline status`` of a real instance, on both stores, loads no broker, telemetry export or worker.

The unit tests (``tests/unit/test_cli_imports.py``) hold ``--help`` and a status of an
unknown id; here a worker has run an instance to its end, so ``status`` prints all of it
(its steps table, its output) as an operator sees it, and still imports only what reading
the database needs.
"""

from __future__ import annotations

import asyncio

import pytest

from stepline import Client, Producer
from stepline.shared.settings import Settings
from tests.support.cli import among, imported_by
from tests.support.fleet import Fleet, process_env
from tests.unit.test_cli_imports import NOT_FOR_EMBEDDED_STATUS, NOT_FOR_POSTGRES_STATUS

pytestmark = [pytest.mark.e2e, pytest.mark.both_backends]


async def test_status_of_a_finished_instance_imports_only_what_reading_it_needs(
    fleet: Fleet, producer: Producer, client: Client, settings: Settings
) -> None:
    await fleet.start_worker()
    instance_id = await producer.start("sequence", {"a": 2, "b": 3}, instance_id="imports-1")
    assert (await client.wait(instance_id, timeout=30)).status == "complete"

    modules, result = await asyncio.to_thread(imported_by, process_env(settings), "status", instance_id)

    assert result.returncode == 0, result
    assert result.stdout.splitlines()[0] == "imports-1  sequence  complete", result.stdout
    assert "output: " in result.stdout
    forbidden = NOT_FOR_EMBEDDED_STATUS if settings.embedded is not None else NOT_FOR_POSTGRES_STATUS
    needless = among(modules, forbidden)
    assert needless == [], f"stepline status imported {needless}"
