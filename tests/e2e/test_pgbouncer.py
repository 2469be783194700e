"""Workers and a scheduler through PgBouncer in transaction pooling mode: the work completes within budget."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from stepline.shared.settings import Settings
from tests.chaos.pgbouncer_fleet import run_fleet
from tests.support import pg_pair

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]


async def test_a_fleet_completes_its_work_through_pgbouncer_in_transaction_mode(
    settings: Settings, tmp_path: Path
) -> None:
    # The test's own database on the local server, reached through PgBouncer on the tests' port.
    url = make_url(settings.database)
    with pg_pair.exclusive("pgbouncer"):
        report = await run_fleet(
            settings,
            tmp_path,
            upstream_port=url.port or 5432,
            database=str(url.database),
            workers=2,
            concurrency=4,
            budget=4,
            instances=20,
            pool_size=4,
        )
    print("\n" + report.render())
    assert report.completed == report.instances == 20
    assert report.wrong_output == report.duplicated_commits == 0
    assert report.errors_in_logs == []  # no server-side prepared statement went through PgBouncer
    assert 1 <= report.most_clients_per_worker <= 4
    assert report.most_server_connections <= 4
    # PostgreSQL's side: PgBouncer's connections only, and no process using more than its budget.
    assert 1 <= report.most_backends <= 4
    assert report.in_use_per_process and report.over_budget == []
    assert report.too_many_clients == []
