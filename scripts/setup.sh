#!/usr/bin/env bash
# Set-up on a fresh machine: a virtual environment with the CPU torch wheel first, then the workbench.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    "${PYTHON:-python3}" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
# torch first, pinned: an unpinned torch would pull a multi-GB CUDA build.
python -m pip install -q torch==2.13.0
# every other package at the version in constraints.txt: a new release can change the rounding, and the numbers
python -m pip install -q -c constraints.txt -e ".[dev,notebooks]"
