#!/usr/bin/env bash
# Create the project virtualenv (.venv) and install stepline in editable mode
# with its dev extras. Idempotent: the install runs only when pyproject.toml
# is newer than the stamp file .venv/.stepline-installed.
#
# Environment:
#   PYTHON  interpreter used to create the venv (default: python3; must be >= 3.11)
#   VENV    venv directory (default: .venv)
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv}"
STAMP="$VENV/.stepline-installed"
MIN_PY="3.11"

say() { printf 'setup: %s\n' "$*"; }
die() { printf 'setup: ERROR: %s\n' "$*" >&2; exit 1; }

# check_python <interpreter> -> fails unless it runs and is >= 3.11
check_python() {
    "$1" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null
}
py_version() { "$1" -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])' 2>/dev/null || echo unknown; }

if [[ -x "$VENV/bin/python" ]]; then
    check_python "$VENV/bin/python" ||
        die "$VENV uses Python $(py_version "$VENV/bin/python"); stepline needs >= $MIN_PY. Remove it with 'make distclean' and re-run."
    say "virtualenv $VENV exists (Python $(py_version "$VENV/bin/python"))"
else
    [[ -e "$VENV" ]] && die "$VENV exists but has no working bin/python; remove it with 'make distclean' and re-run"
    command -v "$PYTHON" >/dev/null 2>&1 || die "'$PYTHON' not found; install Python >= $MIN_PY or set PYTHON=/path/to/python3.11"
    check_python "$PYTHON" ||
        die "'$PYTHON' is Python $(py_version "$PYTHON"); stepline needs >= $MIN_PY (set PYTHON=/path/to/python3.11)"
    say "creating virtualenv $VENV with $PYTHON (Python $(py_version "$PYTHON"))"
    "$PYTHON" -m venv "$VENV"
    rm -f "$STAMP"
fi

[[ -f pyproject.toml ]] || die "pyproject.toml not found in $(pwd)"

if [[ ! -f "$STAMP" || pyproject.toml -nt "$STAMP" ]]; then
    say "installing stepline in editable mode with dev extras ($VENV/bin/pip install -q -e '.[dev]')"
    "$VENV/bin/pip" install -q -e '.[dev]' || die "pip install -e '.[dev]' failed"
    touch "$STAMP"
    say "install done; stamp $STAMP updated"
else
    say "dependencies up to date (pyproject.toml not newer than $STAMP); skipping install"
fi
