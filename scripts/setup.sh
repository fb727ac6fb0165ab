#!/usr/bin/env bash
# Create .venv and install slca-peft with its test and demo extras. Idempotent.
# torch is pinned to the 2.13.0 CPU wheel so no multi-GB CUDA build is pulled on CPU machines;
# on a GPU machine install the torch build you need first and run `pip install -e .[test,demo]`.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
stamp=.venv/.slca-peft-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    .venv/bin/python -m pip install --quiet --upgrade pip
    .venv/bin/python -m pip install --quiet "torch==2.13.0" -e ".[test,demo]"
    touch "$stamp"
fi
