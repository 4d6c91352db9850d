#!/usr/bin/env bash
# The project's test command: lint, format check, type check, then the test suite.
#   scripts/test.sh            # everything (what CI runs)
#   scripts/test.sh -k monitor # extra arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
ruff check .
ruff format --check .
mypy
# Both cores: each test file runs whole in one worker (module fixtures are built once; one thread per worker).
python -m pytest -n "${PYTEST_WORKERS:-2}" --dist loadfile "$@"
