#!/usr/bin/env bash
# Runs the core tests (model, parity, converter, export, evaluation) under PaddlePaddle 2.6.2
# with numpy < 2, in ./.venv26, which is created on first use. Extra arguments go to pytest.
# Set VENV26 to use another location.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV26:-$ROOT/.venv26}"
STAMP="$VENV/.paddle26-installed"
if [ ! -f "$STAMP" ]; then
    echo "[paddle 2.6] creating $VENV"
    python3 -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    "$VENV/bin/python" -m pip install --quiet 'paddlepaddle==2.6.2' 'numpy<2' pyyaml yacs pillow pytest
    touch "$STAMP"
fi
cd "$ROOT"
TESTS=(tests/test_model.py tests/test_parity.py tests/test_convert.py tests/test_export.py
       tests/test_speed_model.py tests/test_engine_eval.py)
"$VENV/bin/python" -c 'import numpy, paddle; print("[paddle 2.6]", paddle.__version__, numpy.__version__)'
"$VENV/bin/python" -m pytest -q "${TESTS[@]}" "$@"
