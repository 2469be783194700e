"""``revisions.head_revision`` reads the migrations' head as Alembic does, without importing it."""

from __future__ import annotations

import subprocess
import sys

from alembic.script import ScriptDirectory

from stepline.shared.db import revisions
from stepline.shared.db.migrate import alembic_config


def test_the_head_is_alembics() -> None:
    script = ScriptDirectory.from_config(alembic_config("postgresql://unused/"))
    assert revisions.head_revision() == script.get_current_head()


def test_checking_the_schema_imports_no_alembic() -> None:
    # What a worker and a scheduler run at every start (Store.check_schema).
    code = (
        "import sys\n"
        "from stepline.shared.db import store\n"
        "store.head_revision()\n"
        "print(sorted(n for n in sys.modules if n.split('.')[0] in ('alembic', 'mako', 'pygments')))\n"
    )
    found = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert found.strip() == "[]"
