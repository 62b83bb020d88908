#!/usr/bin/env bash
# The test command: set up, install headless Chromium for the report test, fetch the default model, run pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
        || echo "chromium could not be installed: the browser test will be skipped"
fi
.venv/bin/workbench models --fetch smollm2-135m-instruct
# Two workers of one thread each (the machines have 2 cores): the notebooks' kernels and the files run side by side.
OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" .venv/bin/python -m pytest -q -n 2 --dist loadgroup --durations=15 "$@"
