#!/usr/bin/env bash
# Install (idempotent) and run the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
# The dashboard's end-to-end test drives Debian's chromium through playwright.
bash scripts/install_browser.sh
export HF_HUB_OFFLINE=1 PREFECT_SERVER_ANALYTICS_ENABLED=false
# Two workers, each test file on one of them (module fixtures are built once): 16 min instead
# of 21 on 2 cores. Pass `-n 0` to run in one process.
.venv/bin/python -m pytest -n 2 --dist loadfile --no-loadscope-reorder --durations=25 "$@"
