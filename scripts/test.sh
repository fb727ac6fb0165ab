#!/usr/bin/env bash
# The project's test command: set up .venv if needed, lint, run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
.venv/bin/ruff check slca_peft recipes tests benchmarks
# One pytest worker per core (pytest-xdist), each with one math thread: two workers of two threads each on two
# cores spend the difference switching (the fast subset: 65 s with torch's default threads, 47 s with one).
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
.venv/bin/python -m pytest -n "${PYTEST_WORKERS:-auto}" --durations=15 "$@"
