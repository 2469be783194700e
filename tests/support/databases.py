"""The run's PostgreSQL databases: each test's cloned from the template ahead of it, dropped behind it.

Cloning the template and dropping a clone take a few tenths of a second each,
waiting on the server's disk; a thousand tests on PostgreSQL paid for both in
their setup and teardown. A thread of the test process now clones the next
test's database while a test runs and drops a finished test's database while
the next one runs. A database is dropped only after its test's teardown
closed everything that used it (its workers are stopped before its database).
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

from tests.support import services


class RunDatabases:
    """The databases of one test process: a migrated ``template``, and the tests' clones of it."""

    def __init__(self, template: str) -> None:
        self._template = template
        services.create_template(template)
        # One thread: the server clones and drops one database at a time for this process.
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="databases")
        self._next = self._thread.submit(services.clone_database, template)
        self._dropped: list[Future[None]] = []

    def take(self) -> str:
        """A fresh database for a test (cloned ahead of time); ``drop`` it after the test."""
        name, self._next = self._next.result(), self._thread.submit(services.clone_database, self._template)
        return name

    def drop(self, name: str) -> None:
        """Drop a test's database in the background; a failure is raised by ``close``."""
        self._dropped = [future for future in self._dropped if not future.done() or future.exception()]
        self._dropped.append(self._thread.submit(services.drop_database, name))

    def close(self) -> None:
        """Drop every database of the run, the template last; raises the first failure."""
        unused = self._thread.submit(self._drop_made, self._next)
        self._thread.shutdown(wait=True)
        try:
            for future in [*self._dropped, unused]:
                future.result()
        finally:
            services.drop_database(self._template)

    @staticmethod
    def _drop_made(made: Future[str]) -> None:
        services.drop_database(made.result())
