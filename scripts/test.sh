#!/usr/bin/env bash
# Sets up a virtual environment (if needed) and runs every check: lint, types, the whole test suite.
# Usage: bash scripts/test.sh [extra pytest arguments]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "==> creating .venv" >&2
  "$PY" -m venv .venv
fi
echo "==> installing the project with its test extra" >&2
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
echo "==> ruff" >&2
.venv/bin/ruff check gateway tests
echo "==> mypy" >&2
.venv/bin/mypy
echo "==> pytest" >&2
exec .venv/bin/pytest -q "$@"
