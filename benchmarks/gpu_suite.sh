#!/usr/bin/env bash
# One command for the GPU numbers in docs/benchmarks.md (see gpu_suite.py for what it measures):
#   PYTHONPATH=. bash benchmarks/gpu_suite.sh --out DIR [--quick]
# Uses python3 from PATH (no virtualenv needed); set PYTHON to use another interpreter.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export PYTHONPATH="$(dirname "$here")${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
exec "${PYTHON:-python3}" "$here/gpu_suite.py" "$@"
