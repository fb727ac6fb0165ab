#!/usr/bin/env bash
# The project's test command: set up .venv if needed, lint, run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
.venv/bin/ruff check slca_peft recipes tests benchmarks
# One pytest worker per core (pytest-xdist): the suite's tests are independent processes' worth of work.
.venv/bin/python -m pytest -n "${PYTEST_WORKERS:-auto}" --durations=15 "$@"
