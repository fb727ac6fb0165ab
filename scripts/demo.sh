#!/usr/bin/env bash
# The main job on its offline default: set up .venv, then run recipes/train_seq.py on its
# embedded demo (handwritten digits, 5 tasks of 2 classes, a tiny ViT). Extra flags are passed on.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
.venv/bin/python recipes/train_seq.py --config recipes/configs/demo_digits.yaml "$@"
