#!/usr/bin/env bash
# Runs the whole test suite under PaddlePaddle 2.6.2 (the newest paddlepaddle-gpu on PyPI) with
# numpy < 2 (and Paddle2ONNX 1.x, the last for Paddle 2), in ./.venv26, which is created on first use
# and again when this script changes. Extra arguments go to pytest.
# Set VENV26 to use another location.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV26:-$ROOT/.venv26}"
STAMP="$VENV/.paddle26-installed"
if [ ! -f "$STAMP" ] || [ "${BASH_SOURCE[0]}" -nt "$STAMP" ]; then
    echo "[paddle 2.6] creating $VENV"
    python3 -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    "$VENV/bin/python" -m pip install --quiet 'paddlepaddle==2.6.2' 'numpy<2' pyyaml yacs pillow pytest pytest-timeout \
        'paddle2onnx<2' onnxruntime
    touch "$STAMP"
fi
cd "$ROOT"
"$VENV/bin/python" -c 'import numpy, paddle; print("[paddle 2.6]", paddle.__version__, numpy.__version__)'
"$VENV/bin/python" -m pytest -q "$@"  # pytest.ini: tests/ unless paths are given
