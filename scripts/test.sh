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
missing=()
while read -r pkg _; do
  [ -n "$pkg" ] && [ "${pkg:0:1}" != "#" ] || continue
  command -v "$pkg" >/dev/null 2>&1 || [ -x "/usr/sbin/$pkg" ] || [ -x "/usr/bin/$pkg" ] || missing+=("$pkg")
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
echo "==> installing the project with its test extra" >&2
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
echo "==> ruff" >&2
.venv/bin/ruff check gateway tests
echo "==> mypy" >&2
.venv/bin/mypy
echo "==> import contracts (the products' borders and the layers)" >&2
.venv/bin/lint-imports --no-cache
echo "==> pytest" >&2
exec .venv/bin/pytest -q "$@"
