#!/usr/bin/env bash
# The main job: set up, then run the full study on the bundled default model.
# Writes runs/study/ (tables, figures, report.html, report.md) and refreshes figures/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/workbench study --config configs/study.toml --out runs/study "$@"
