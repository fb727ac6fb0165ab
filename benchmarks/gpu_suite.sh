#!/usr/bin/env bash
# One command for the GPU numbers in docs/benchmarks.md (see gpu_suite.py for what it measures):
#   PYTHONPATH=. bash benchmarks/gpu_suite.sh --out DIR [--quick] [--released_code_dir SLCA_CHECKOUT]
# With --released_code_dir (a checkout of the authors' code, in an environment with timm 0.5.4: see
# bench_released.py), the paired benchmark against that code runs afterwards into DIR/bench_released.txt.
# Uses python3 from PATH (no virtualenv needed); set PYTHON to use another interpreter.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export PYTHONPATH="$(dirname "$here")${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
args=() released="" out="" quick=()
while [ $# -gt 0 ]; do
    case "$1" in
        --released_code_dir) released="$2"; shift 2 ;;
        --released_code_dir=*) released="${1#*=}"; shift ;;
        --out) out="$2"; args+=("$1" "$2"); shift 2 ;;
        --quick) quick=(--quick); args+=("$1"); shift ;;
        *) args+=("$1"); shift ;;
    esac
done
"${PYTHON:-python3}" "$here/gpu_suite.py" "${args[@]}"
if [ -n "$released" ]; then
    "${PYTHON:-python3}" "$here/bench_released.py" --released_code_dir "$released" --threads 1 "${quick[@]}" \
        | tee "${out:-.}/bench_released.txt"
fi
