"""The newest schema revision this code ships, read without importing Alembic.

Every worker and scheduler checks the database's revision at start-up
(``Store.check_schema``). Asking Alembic (``ScriptDirectory.get_current_head``)
imports it, with Mako and Pygments' lexers: about 80 ms of every process start.
The migrations' own ``revision`` and ``down_revision`` lines say the same, and
``tests/unit/test_revisions.py`` holds this to Alembic's answer.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

from stepline.shared.errors import StorageError

VERSIONS = Path(__file__).with_name("migrations") / "versions"
_REVISION = re.compile(r"^revision\s*(?::\s*str\s*)?=\s*[\"'](?P<id>[^\"']+)[\"']", re.MULTILINE)
_DOWN = re.compile(r"^down_revision\s*(?::[^=]+)?=\s*(?:None|[\"'](?P<id>[^\"']+)[\"'])", re.MULTILINE)


@functools.cache
def head_revision() -> str | None:
    """The revision no migration follows: the one a migrated database is at (None: there is none).

    Raises:
        StorageError: a migration file says no revision, or two revisions have no follower.
    """
    revisions: set[str] = set()
    followed: set[str] = set()
    for path in sorted(VERSIONS.glob("*.py")):
        text = path.read_text(encoding="utf-8")
        revision, down = _REVISION.search(text), _DOWN.search(text)
        if revision is None or down is None:
            raise StorageError(f"the migration {path.name} says no revision and down_revision")
        revisions.add(revision["id"])
        if down["id"]:
            followed.add(down["id"])
    heads = revisions - followed
    if len(heads) > 1:
        raise StorageError(f"the migrations have several heads: {', '.join(sorted(heads))}")
    return next(iter(heads), None)


__all__ = ["head_revision"]
