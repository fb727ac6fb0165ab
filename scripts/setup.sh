#!/usr/bin/env bash
# Create .venv and install slca-peft with its test and demo extras. Idempotent.
# torch is pinned to the 2.13.0 CPU wheel so no multi-GB CUDA build is pulled on CPU machines;
# on a GPU machine install the torch build you need first and run `pip install -e .[test,demo]`.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
TORCH="torch==2.13.0"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
stamp=.venv/.slca-peft-installed
if [ -f "$stamp" ] && [ ! pyproject.toml -nt "$stamp" ]; then
    exit 0
fi
pip=(.venv/bin/python -m pip install --quiet)
# uv installs what pip would, downloading and byte-compiling in parallel: a fresh install in ~30 s instead
# of ~60-90 s. Byte-compiling at install matters: without it every test process compiles torch on import.
with_uv() {
    "${pip[@]}" uv >/dev/null 2>&1 && [ -x .venv/bin/uv ] || return 1
    local uv=(.venv/bin/uv pip install --quiet --python .venv/bin/python --compile-bytecode)
    # uv reads no pip configuration: a CPU torch wheel that pip finds in a local folder is handed to uv,
    # anything else (PyPI's builds, a pip cap on versions) stays pip's to install.
    local links
    links=$(.venv/bin/python -m pip config get global.find-links 2>/dev/null || true)
    if [ -n "$links" ] && compgen -G "$links/${TORCH/==/-}+cpu-*.whl" >/dev/null; then
        "${uv[@]}" --find-links "$links" "$TORCH" -e ".[test,demo]"
    else
        "${pip[@]}" "$TORCH" && "${uv[@]}" -e ".[test,demo]"
    fi
}
if ! with_uv; then  # no uv to be had, or it could not install (an index only pip is set up for): pip does it all
    "${pip[@]}" --upgrade pip
    "${pip[@]}" "$TORCH" -e ".[test,demo]"
fi
touch "$stamp"
