#!/usr/bin/env bash
# Creates ./.venv with the project's requirements (once) and puts it first on PATH.
# Sourced by the other scripts; set VENV to use another location.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
STAMP="$VENV/.requirements-installed"
if [ ! -f "$STAMP" ] || [ "$ROOT/requirements.txt" -nt "$STAMP" ] || [ "$ROOT/requirements-dev.txt" -nt "$STAMP" ]; then
    echo "[setup] creating $VENV"
    python3 -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    "$VENV/bin/python" -m pip install --quiet -r "$ROOT/requirements-dev.txt"
    touch "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
cd "$ROOT"
