#!/usr/bin/env bash
# Create an isolated environment, install everything the tests need, lint (ruff check and
# ruff format --check), run the tests.
#   bash scripts/test.sh [pytest args]
# Environment: VENV (default .venv) - where the environment goes.
set -euo pipefail
# no wheel cache: the CI machine's disk can be small, and the environment is built once
export PIP_NO_CACHE_DIR=1
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build.
"$VENV/bin/python" -m pip install -q "torch==2.13.0"
"$VENV/bin/python" -m pip install -q -c constraints.txt -e ".[test]"
"$VENV/bin/ruff" check .
"$VENV/bin/ruff" format --check .
exec "$VENV/bin/python" -m pytest "$@"
