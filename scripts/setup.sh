#!/usr/bin/env bash
# Creates ./.venv (once), installs a requirements file into it (again when the file changes) and
# puts it first on PATH. Sourced by the other scripts, with the file as argument: requirements.txt
# (the default: running the project) or requirements-dev.txt (that plus the test and ONNX
# packages). Set VENV to use another location.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
REQUIREMENTS="${1:-requirements.txt}"
STAMP="$VENV/.installed-$REQUIREMENTS"
if [ ! -x "$VENV/bin/python" ]; then
    echo "[setup] creating $VENV"
    python3 -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
fi
if [ ! -f "$STAMP" ] || [ "$ROOT/requirements.txt" -nt "$STAMP" ] || [ "$ROOT/$REQUIREMENTS" -nt "$STAMP" ]; then
    echo "[setup] installing $REQUIREMENTS into $VENV"
    "$VENV/bin/python" -m pip install --quiet -r "$ROOT/$REQUIREMENTS"
    touch "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
cd "$ROOT"
