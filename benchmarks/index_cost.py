"""What the indexes of revision 0009 cost the hot path: instance writes with and without them.

``python -m benchmarks.index_cost DATABASE_URL`` on a database filled by
``python -m benchmarks.bigdb --keep-bigdb`` (so the indexes are big, as they are in
production). Each round writes ``LIFECYCLES`` instances the way the engine does, one
transaction per statement: the insert at start, the version bump of each of 10 step
commits (``updated_at``, ``version``: HOT while no indexed column changes), three
status changes (running, waiting, running) and the finish. Rounds alternate with the
three indexes and without them (dropped inside the round's own database, then built
again); the written rows are deleted after each round. Prints the microseconds per
instance each way and the share of updates that stayed HOT.

One connection, so it can run beside others on a shared server; the throughput
section (``--only throughput``) needs about 75 connections with 4 workers.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import uuid
from typing import Any

import psycopg

INDEXES = {
    "ix_instances_build_created": "CREATE INDEX ix_instances_build_created ON instances "
    "(build_id, created_at DESC, id)",
    "ix_instances_workflow_created": "CREATE INDEX ix_instances_workflow_created ON instances "
    "(workflow, created_at DESC, id)",
    "ix_instances_status_workflow": "CREATE INDEX ix_instances_status_workflow ON instances "
    "(status, workflow)",
}
LIFECYCLES = 1_000
STEPS = 10

INSERT = """INSERT INTO instances (id, workflow, status, params, build_id, created_at, updated_at)
VALUES (%(id)s, 'order-fulfilment', 'running', '{"order": 1}', 'build-current', now(), now())"""
BUMP = "UPDATE instances SET version = version + 1, updated_at = now() WHERE id = %(id)s"
STATUS = (
    "UPDATE instances SET status = %(status)s, version = version + 1, updated_at = now() WHERE id = %(id)s"
)
FINISH = """UPDATE instances SET status = 'complete', output = '{"ok": true}', finished_at = now(),
updated_at = now(), version = version + 1 WHERE id = %(id)s"""


def lifecycles(conn: psycopg.Connection[Any], prefix: str) -> float:
    """Write ``LIFECYCLES`` instances start to finish; seconds taken."""
    began = time.perf_counter()
    for n in range(LIFECYCLES):
        key = {"id": f"{prefix}-{n:06d}"}
        conn.execute(INSERT.encode(), key)
        for step in range(STEPS):
            conn.execute(BUMP.encode(), key)
            if step in (3, 4, 6):
                status = {3: "waiting", 4: "running", 6: "waiting"}[step]
                conn.execute(STATUS.encode(), {**key, "status": status})
        conn.execute(FINISH.encode(), key)
    return time.perf_counter() - began


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.index_cost", description=__doc__)
    parser.add_argument("database_url")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--async-commit",
        action="store_true",
        help="synchronous_commit off: leave the WAL flush (most of a commit's time, and its noise) out",
    )
    args = parser.parse_args(argv)
    results: dict[str, list[float]] = {"with": [], "without": []}
    with psycopg.connect(args.database_url, autocommit=True) as conn:
        if args.async_commit:
            conn.execute(b"SET synchronous_commit = off")
        for round_ in range(args.rounds):
            for variant in ("without", "with"):
                present = {row[0] for row in conn.execute(b"SELECT indexname FROM pg_indexes").fetchall()}
                for name, ddl in INDEXES.items():
                    if variant == "without" and name in present:
                        conn.execute(f"DROP INDEX {name}".encode())
                    elif variant == "with" and name not in present:
                        conn.execute(ddl.encode())
                before = conn.execute(
                    b"SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables WHERE relname = 'instances'"
                ).fetchone()
                prefix = f"cost-{uuid.uuid4().hex[:8]}"
                seconds = lifecycles(conn, prefix)
                conn.execute(b"DELETE FROM instances WHERE id LIKE %s", (prefix + "%",))
                time.sleep(0.6)  # the statistics collector reports about every 0.5 s
                after = conn.execute(
                    b"SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables WHERE relname = 'instances'"
                ).fetchone()
                assert before is not None and after is not None
                updates, hot = after[0] - before[0], after[1] - before[1]
                results[variant].append(seconds)
                print(
                    f"round {round_ + 1} {variant:>7} the indexes: {seconds / LIFECYCLES * 1e6:,.0f} us per "
                    f"instance ({LIFECYCLES} x insert, {STEPS} bumps, 3 status changes, finish); "
                    f"{hot}/{updates} updates HOT"
                )
    with_s, without_s = statistics.median(results["with"]), statistics.median(results["without"])
    print(
        f"median: {with_s / LIFECYCLES * 1e6:,.0f} us with, {without_s / LIFECYCLES * 1e6:,.0f} us without "
        f"the indexes: {with_s / without_s:.3f}x"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
