#!/usr/bin/env bash
# Sets up a virtual environment (if needed) and runs every check: lint, types, import contracts, the whole suite.
# Usage: bash scripts/test.sh [extra pytest arguments]
#   bash scripts/test.sh -m unit              one tier (unit, contract, e2e, simulator, hub: see pyproject.toml)
#   bash scripts/test.sh tests/test_engine.py one module
#   PYTEST_WORKERS=0 bash scripts/test.sh     in this process, one test after another (default: 4 workers)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "==> creating .venv" >&2
  "$PY" -m venv .venv
fi
missing=()
while read -r cmd rest; do
  [ -n "$cmd" ] && [ "${cmd:0:1}" != "#" ] || continue
  pkgs=(${rest%%#*})  # the packages that bring the command, when not one named like it
  [ ${#pkgs[@]} -gt 0 ] || pkgs=("$cmd")
  command -v "$cmd" >/dev/null 2>&1 || [ -x "/usr/sbin/$cmd" ] || [ -x "/usr/bin/$cmd" ] || missing+=("${pkgs[@]}")
done < packaging/test-packages.txt
if [ ${#missing[@]} -gt 0 ]; then
  echo "==> installing Debian packages the tests need: ${missing[*]}" >&2
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  if ! { $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null 2>&1 ||
         { $SUDO apt-get update -qq >/dev/null 2>&1 &&
           $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; }; }; then
    echo "error: could not install ${missing[*]} with apt-get; install them by hand (see packaging/test-packages.txt)" >&2
    exit 1
  fi
fi
# pip runs again only when the project's metadata changed since the last install (it takes seconds even then).
stamp=.venv/.installed-pyproject
if ! cmp -s pyproject.toml "$stamp"; then
  echo "==> installing the project with its test extra" >&2
  .venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
  cp pyproject.toml "$stamp"
fi

# The suite starts the gateway in dozens of interpreters and runs on several workers: compile the sources once, and
# let pytest cache its rewritten test modules (in the gitignored __pycache__ folders) before the workers need them,
# while the type check runs beside it.
export PYTHONDONTWRITEBYTECODE=
.venv/bin/python -m compileall -q gateway tests >/dev/null
.venv/bin/pytest --collect-only -q "$@" >/dev/null 2>&1 &
warm=$!
trap 'kill "$warm" 2>/dev/null || true' EXIT

echo "==> ruff" >&2
.venv/bin/ruff check gateway tests
echo "==> mypy" >&2
.venv/bin/mypy
echo "==> import contracts (the products' borders and the layers)" >&2
.venv/bin/lint-imports --no-cache
wait "$warm" || true  # a collection error is reported by the run itself
echo "==> pytest" >&2
workers=${PYTEST_WORKERS:-4}
if [ "$workers" = 0 ]; then
  exec .venv/bin/pytest -q "$@"
fi
exec .venv/bin/pytest -q -n "$workers" --dist loadgroup "$@"
