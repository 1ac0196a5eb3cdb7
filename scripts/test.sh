#!/usr/bin/env bash
# Sets up ./.venv if needed and runs the test suite. Extra arguments go to pytest.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh" requirements-dev.txt
python -m pytest -q "$@"  # pytest.ini: tests/ unless paths are given
